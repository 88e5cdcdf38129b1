//! WebSocket close codes a gateway uses, in the private range 4000–4999.
//!
//! The range says what a client should do, so a client can act on codes it does not know:
//! - 4000–4499: **reconnect and resume**: reconnect (to any gateway, after a short randomized
//!   backoff) and re-join each room with `since` = the last seq it received. Nothing is lost.
//! - 4500–4999: **do not reconnect** without changing something (credentials, the request).

/// The gateway is shutting down (drain): reconnect elsewhere and resume with `since`.
pub const SERVER_RESTARTING: u16 = 4000;
/// The connection fell too far behind (its send queue overflowed): reconnect and resume.
pub const SLOW_CONSUMER: u16 = 4001;
/// The gateway could not guarantee order for a room (a gap it could not repair): reconnect and
/// resume.
pub const RESYNC: u16 = 4002;
/// The connection's token expired: reconnect with a fresh token and resume.
pub const TOKEN_EXPIRED: u16 = 4003;
/// The gateway holds as many connections as it is configured for: reconnect (another gateway,
/// after a randomized backoff) and resume.
pub const GATEWAY_FULL: u16 = 4004;
/// Nothing was heard from the client (not even a pong) within the idle timeout: reconnect and
/// resume.
pub const IDLE_TIMEOUT: u16 = 4005;
/// The client broke the protocol in a way that ends the connection. Reserved: this version
/// never sends it (a malformed or binary frame gets a `bad_frame` error and the connection stays
/// open), but clients must already treat it, and every code in 4500–4999, as final.
pub const PROTOCOL_VIOLATION: u16 = 4500;

/// Whether a client should reconnect and resume after this close code.
pub fn should_resume(code: u16) -> bool {
    (4000..4500).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tell_the_client_what_to_do() {
        assert!(should_resume(SERVER_RESTARTING));
        assert!(should_resume(SLOW_CONSUMER));
        assert!(should_resume(RESYNC));
        assert!(should_resume(TOKEN_EXPIRED));
        assert!(should_resume(GATEWAY_FULL));
        assert!(should_resume(IDLE_TIMEOUT));
        assert!(!should_resume(PROTOCOL_VIOLATION));
        assert!(!should_resume(1000));
    }
}
