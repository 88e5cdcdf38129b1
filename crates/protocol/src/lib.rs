//! Wire types shared by every Chorus box: client frames (`chorus.v1`), the writer's API bodies, the
//! stored item, the SNS payload, validated newtypes and close codes.
//!
//! Serde only: no async runtime, no AWS, no HTTP, so every box (and any Rust client) can depend
//! on it cheaply. A change here is a wire change: the golden fixtures in `tests/fixtures` make it
//! visible in review.

pub mod api;
pub mod bus;
pub mod close;
pub mod frames;
pub mod ids;
pub mod message;

pub use bus::BusPayload;
pub use frames::{ClientFrame, ErrorCode, ServerFrame};
pub use ids::{Body, ClientMsgId, InvalidValue, PageLimit, RoomId, Seq, UserId};
pub use message::{MessageEvent, StoredBatch, StoredEntry};
