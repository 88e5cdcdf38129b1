//! The systemd notify protocol (`Type=notify`, `WatchdogSec=`), without a C library: one datagram
//! to `$NOTIFY_SOCKET` per state change. Everything here is a no-op outside systemd.

use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to systemd. Returns whether there was a socket to send to.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match send(&path, state.as_bytes()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "systemd notify failed");
            false
        }
    }
}

#[cfg(target_os = "linux")]
fn send(path: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(path))?,
    };
    UnixDatagram::unbound()?.send_to_addr(message, &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send(_path: &std::ffi::OsStr, _message: &[u8]) -> std::io::Result<()> {
    Ok(())
}

/// The service is ready (systemd starts dependent units and counts the start as done).
pub fn ready() {
    notify("READY=1");
}

/// The service is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Pings the watchdog at half the interval systemd asked for (`WATCHDOG_USEC`), from a task on
/// the runtime, so a wedged runtime stops the pings and systemd restarts the service.
pub fn spawn_watchdog() {
    let Some(interval) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|usec| usec.parse::<u64>().ok())
        .filter(|usec| *usec > 0)
        .map(|usec| Duration::from_micros(usec / 2))
    else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("chorus-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        super::send(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
