//! A connection's writer task: drains the connection's [`outbox`](crate::hub::outbox) into the
//! socket, everything waiting at once and then one flush, until it is asked to close or every
//! producer is gone.

use std::collections::VecDeque;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt as _};

use crate::hub::outbox::{Next, Outbound, OutboxReceiver};

pub(super) async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<S, Message>,
    mut rx: OutboxReceiver,
) where
    S: Sink<Message> + Send,
{
    fn message(item: Outbound) -> Message {
        match item {
            Outbound::Text(frame) => Message::Text(frame),
            Outbound::Ping => Message::Ping(Default::default()),
        }
    }
    let mut batch = VecDeque::new();
    loop {
        match rx.next(&mut batch).await {
            // Batch: queue everything that was waiting, then flush once.
            Next::Send => {
                for item in batch.drain(..) {
                    if sink.feed(message(item)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
            Next::Close((code, reason)) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
            Next::Ended => break,
        }
    }
    let _ = sink.close().await;
}
