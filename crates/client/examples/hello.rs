//! Joins a room, says hello, and prints what happens until the greeting comes back from the room
//! (stored, then delivered like everyone else's messages):
//!
//! ```sh
//! cargo run -p chorus-client --example hello -- lobby \
//!     'ws://127.0.0.1:8081/ws?user=john' 'ws://127.0.0.1:8082/ws?user=john'
//! ```
//!
//! Several URLs are tried in turn: stop the first gateway while it runs and it moves on, resumes
//! the room and still gets every message once. With a gateway that wants tokens, put one in
//! `CHORUS_TOKEN`.

use chorus_client::{ClientError, Event, RoomId, Session};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let mut args = std::env::args().skip(1);
    let room = RoomId::parse(args.next().unwrap_or_else(|| "lobby".into()))?;
    let mut urls: Vec<String> = args.collect();
    if urls.is_empty() {
        urls.push("ws://127.0.0.1:8081/ws?user=john".into());
    }
    let mut session = Session::new(urls, std::env::var("CHORUS_TOKEN").ok());
    session.join(room.clone(), None);
    let hello = session.send(&room, "Hello world")?;
    let mut failed_attempts = 0;
    loop {
        match session.next_event().await? {
            Event::Connected { url } => println!("connected to {url}"),
            Event::Joined { room, seq, resumed } => {
                failed_attempts = 0;
                println!("joined {room} at seq {seq} (resumed: {resumed})");
            }
            Event::Message(m) => {
                println!("[{} #{}] {}: {}", m.room, m.seq, m.sender, m.body.as_str());
                if m.id == hello {
                    return session.close().await;
                }
            }
            Event::Acked { seq, .. } => println!("hello is stored at seq {seq}"),
            Event::HistoryExpired { room, message, .. } => {
                println!("messages of {room} were missed: {message}");
            }
            Event::Disconnected {
                code,
                reason,
                retry_in,
            } => {
                println!("disconnected ({code:?}: {reason}); reconnecting in {retry_in:?}");
            }
            Event::ConnectFailed { url, error, .. } => {
                println!("cannot connect to {url}: {error}");
                failed_attempts += 1;
                if failed_attempts == 10 {
                    return Err(error);
                }
            }
            other => println!("{other:?}"),
        }
    }
}
