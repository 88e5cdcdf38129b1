//! The cheapest WebSocket client that still speaks the protocol: a hand-written upgrade request,
//! masked client frames, and a parser of server frames that borrows from the read buffer. The
//! load generator shares the machine's two cores with the server under test, so it does no
//! UTF-8 validation, no allocation per frame and no JSON parsing: it finds the few fields it
//! needs by their byte prefix.

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection from `source` to `server` and upgrades it at `path` with subprotocol
/// `chorus.v1`. Returns the stream and any bytes read past the upgrade response.
///
/// A source port of 0 lets the kernel choose, but that search is linear in the ports already
/// bound on the address: tens of thousands of connections should name their ports.
pub(crate) async fn connect(
    source: SocketAddrV4,
    server: SocketAddr,
    path: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(SocketAddr::V4(source))
        .with_context(|| format!("binding {source}"))?;
    let mut stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connecting {source} → {server}"))?;
    stream.set_nodelay(true)?;
    // The key's accept value is not checked: both servers under test are known.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chorus.v1\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            bail!("upgrade response over {} bytes", buf.len());
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            bail!("connection closed during the upgrade");
        }
        filled += n;
        if let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let status = String::from_utf8_lossy(&buf[..end.min(200)]).into_owned();
                bail!("upgrade refused: {status}");
            }
            return Ok((stream, buf[end + 4..filled].to_vec()));
        }
    }
}

/// A text frame from the client: masked (as the protocol requires) with the all-zero key, so the
/// payload goes out as is.
pub(crate) fn text_frame(payload: &str) -> Vec<u8> {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 14);
    frame.push(0x81);
    match len {
        0..=125 => frame.push(0x80 | len as u8),
        126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// One server frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Text(&'a [u8]),
    /// A close frame and its code, if it has one.
    Close(Option<u16>),
    /// Binary, ping, pong, continuation: not used by either server.
    Other,
}

/// Parses the frame at the start of `buf`: `None` until it is complete, else the frame and the
/// bytes it takes.
pub(crate) fn parse_frame(buf: &[u8]) -> Option<(Frame<'_>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at): (usize, usize) = match buf[1] & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    if masked {
        // Servers never mask; skip the key if one does (the payload is then unusable).
        at += 4;
    }
    let payload = buf.get(at..at.checked_add(len)?)?;
    let frame = match opcode {
        0x1 if !masked => Frame::Text(payload),
        0x8 => Frame::Close(
            payload
                .get(..2)
                .map(|code| u16::from_be_bytes([code[0], code[1]])),
        ),
        _ => Frame::Other,
    };
    Some((frame, at + len))
}

/// Position of `needle` in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The decimal number at the start of `bytes` and the bytes after it.
pub(crate) fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let n = bytes[..digits]
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some((n, &bytes[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_in_pieces() {
        let mut buf = vec![0x81, 5];
        buf.extend_from_slice(b"hello");
        buf.extend_from_slice(&[0x88, 2, 0x0f, 0xa1]);
        assert_eq!(parse_frame(&buf[..4]), None);
        let (frame, used) = parse_frame(&buf).unwrap();
        assert_eq!((frame, used), (Frame::Text(b"hello"), 7));
        assert_eq!(parse_frame(&buf[7..]).unwrap().0, Frame::Close(Some(4001)));
        let long = "x".repeat(300);
        let mut buf = vec![0x81, 126, 1, 44];
        buf.extend_from_slice(long.as_bytes());
        assert_eq!(
            parse_frame(&buf).unwrap(),
            (Frame::Text(long.as_bytes()), 304)
        );
    }

    #[test]
    fn client_frames_are_masked_with_a_zero_key() {
        assert_eq!(text_frame("hi"), vec![0x81, 0x82, 0, 0, 0, 0, b'h', b'i']);
        assert_eq!(&text_frame(&"x".repeat(200))[..4], &[0x81, 0xfe, 0, 200]);
    }

    #[test]
    fn numbers_are_read_from_the_front() {
        assert_eq!(leading_number(b"12:x"), Some((12, &b":x"[..])));
        assert_eq!(leading_number(b":x"), None);
    }
}
