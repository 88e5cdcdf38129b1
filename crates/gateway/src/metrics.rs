//! The gateway's Prometheus metrics.

use chorus_service::metrics::{Counter, Exposition, Gauge, Histogram};

use std::sync::Arc;

use crate::auth::RefusalReason;
use crate::bus::certs::CertMetrics;

/// Every counter and gauge of one gateway.
#[derive(Debug, Default)]
pub(crate) struct GatewayMetrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub frames_received: Counter,
    pub frames_rejected: Counter,
    pub sends_acked: Counter,
    pub sends_failed: Counter,
    /// Scrollback (`history`) requests answered with a page, and those the writer failed.
    pub history_served: Counter,
    pub history_failed: Counter,
    pub delivered: Counter,
    pub replayed: Counter,
    pub slow_consumers: Counter,
    pub bus_notifications: Counter,
    pub bus_rejected: Counter,
    pub bus_events_unrouted: Counter,
    pub bus_events_duplicate: Counter,
    pub bus_events_held: Counter,
    pub bus_events_dropped: Counter,
    pub gap_fills: Counter,
    pub joins: Counter,
    pub leaves: Counter,
    pub bus_events_in: Counter,
    /// Time to order and queue one SNS notification's events for every local member.
    pub fanout: Histogram,
    pub rejected_malformed: Counter,
    pub rejected_topic: Counter,
    pub rejected_signature: Counter,
    pub rejected_cert_unavailable: Counter,
    pub rejected_busy: Counter,
    pub rejected_body_timeout: Counter,
    /// Signing-key look-ups of SNS verification.
    pub certs: Arc<CertMetrics>,
    pub rejected_payload: Counter,
    pub tail_fills: Counter,
    /// Rooms given up on (a hole the writer could not fill): members closed with RESYNC.
    pub resyncs: Counter,
    /// Joins refused because history after their `since` has expired.
    pub history_expired: Counter,
    /// Members registered in the hub, over all rooms (a connection in three rooms counts three).
    pub room_members: Gauge,
    pub refused_full: Counter,
    pub refused_missing: Counter,
    pub refused_malformed: Counter,
    pub refused_signature: Counter,
    pub refused_expired: Counter,
    pub refused_audience: Counter,
    pub rate_limited_sends: Counter,
    pub rate_limited_joins: Counter,
    pub forbidden_joins: Counter,
    pub room_limit_hits: Counter,
    pub idle_timeouts: Counter,
    pub tokens_expired: Counter,
}

impl GatewayMetrics {
    /// Prometheus text exposition; `rooms` is the number of rooms with local members.
    pub(crate) fn render(&self, rooms: usize) -> String {
        let rooms_gauge = Gauge::default();
        rooms_gauge.set(i64::try_from(rooms).unwrap_or(i64::MAX));
        Exposition::new()
            .gauge("chorus_gateway_rooms", "Rooms with at least one local member.", &rooms_gauge)
            .gauge(
                "chorus_gateway_room_members",
                "Room memberships of local connections (joined, or joining), over all rooms.",
                &self.room_members,
            )
            .counter(
                "chorus_gateway_room_changes_total",
                "Joins and leaves.",
                "kind",
                &[("join", &self.joins), ("leave", &self.leaves)],
            )
            .counter(
                "chorus_gateway_messages_total",
                "Messages in from the bus (events, before de-duplication) and out to clients (frames queued).",
                "direction",
                &[("in", &self.bus_events_in), ("out", &self.delivered)],
            )
            .histogram(
                "chorus_gateway_fanout_seconds",
                "Time to order and queue one SNS notification's events for every local member.",
                "",
                &[("", &self.fanout)],
            )
            .counter(
                "chorus_gateway_bus_rejected_total",
                "SNS posts refused, by reason.",
                "reason",
                &[
                    ("malformed", &self.rejected_malformed),
                    ("wrong_topic", &self.rejected_topic),
                    ("signature", &self.rejected_signature),
                    ("cert_unavailable", &self.rejected_cert_unavailable),
                    ("busy", &self.rejected_busy),
                    ("body_timeout", &self.rejected_body_timeout),
                    ("payload", &self.rejected_payload),
                ],
            )
            .gauge(
                "chorus_gateway_connections",
                "Open WebSocket connections.",
                &self.connections,
            )
            .counter(
                "chorus_gateway_connections_total",
                "WebSocket connections accepted.",
                "",
                &[("", &self.connections_total)],
            )
            .counter(
                "chorus_gateway_client_frames_total",
                "Client frames by outcome.",
                "result",
                &[
                    ("accepted", &self.frames_received),
                    ("rejected", &self.frames_rejected),
                ],
            )
            .counter(
                "chorus_gateway_sends_total",
                "Client sends by outcome.",
                "result",
                &[("acked", &self.sends_acked), ("failed", &self.sends_failed)],
            )
            .counter(
                "chorus_gateway_history_requests_total",
                "Scrollback (history) requests by outcome (refused ones count in \
                 chorus_gateway_requests_limited_total, like joins).",
                "result",
                &[
                    ("served", &self.history_served),
                    ("failed", &self.history_failed),
                ],
            )
            .counter(
                "chorus_gateway_delivered_total",
                "Live message frames queued to clients.",
                "",
                &[("", &self.delivered)],
            )
            .counter(
                "chorus_gateway_replayed_total",
                "History message frames replayed to joining clients.",
                "",
                &[("", &self.replayed)],
            )
            .counter(
                "chorus_gateway_slow_consumers_total",
                "Connections closed because their queue overflowed.",
                "",
                &[("", &self.slow_consumers)],
            )
            .counter(
                "chorus_gateway_bus_notifications_total",
                "SNS posts by outcome.",
                "result",
                &[
                    ("accepted", &self.bus_notifications),
                    ("rejected", &self.bus_rejected),
                ],
            )
            .counter(
                "chorus_gateway_bus_events_total",
                "Bus message events not delivered at once, by reason.",
                "reason",
                &[
                    ("no_local_members", &self.bus_events_unrouted),
                    ("duplicate", &self.bus_events_duplicate),
                    ("held_out_of_order", &self.bus_events_held),
                    ("dropped_buffer_full", &self.bus_events_dropped),
                ],
            )
            .counter(
                "chorus_gateway_sns_certificates_total",
                "Signing-key look-ups of SNS verification, by result: cached, fetched, fetch \
                 failed, a failure remembered (no fetch), or refused because too many fetches \
                 were under way.",
                "result",
                &[
                    ("hit", &self.certs.hits),
                    ("fetched", &self.certs.fetched),
                    ("failed", &self.certs.failed),
                    ("negative_hit", &self.certs.negative_hits),
                    ("limited", &self.certs.limited),
                ],
            )
            .counter(
                "chorus_gateway_repairs_total",
                "History reads that recovered messages the bus did not deliver, by kind: a hole \
                 before a later seq, or a lost last message found when the room went quiet; and \
                 rooms given up on because a hole could not be filled (members closed with 4002).",
                "kind",
                &[
                    ("gap", &self.gap_fills),
                    ("tail", &self.tail_fills),
                    ("resync", &self.resyncs),
                ],
            )
            .counter(
                "chorus_gateway_connections_refused_total",
                "WebSocket requests refused, by reason: the gateway was full, or the credentials \
                 were missing, malformed, badly signed, expired or for another audience.",
                "reason",
                &[
                    ("full", &self.refused_full),
                    ("missing", &self.refused_missing),
                    ("malformed", &self.refused_malformed),
                    ("signature", &self.refused_signature),
                    ("expired", &self.refused_expired),
                    ("audience", &self.refused_audience),
                ],
            )
            .counter(
                "chorus_gateway_requests_limited_total",
                "Client requests refused by a limit, by limit.",
                "limit",
                &[
                    ("send_rate", &self.rate_limited_sends),
                    ("join_rate", &self.rate_limited_joins),
                    ("room_not_allowed", &self.forbidden_joins),
                    ("rooms_per_connection", &self.room_limit_hits),
                    ("history_expired", &self.history_expired),
                ],
            )
            .counter(
                "chorus_gateway_closed_total",
                "Connections the gateway closed, by reason (slow consumers are counted apart).",
                "reason",
                &[
                    ("idle", &self.idle_timeouts),
                    ("token_expired", &self.tokens_expired),
                ],
            )
            .finish()
    }

    /// Counts a WebSocket request refused for its credentials.
    pub(crate) fn refused(&self, reason: RefusalReason) {
        match reason {
            RefusalReason::Missing => &self.refused_missing,
            RefusalReason::Malformed => &self.refused_malformed,
            RefusalReason::Signature => &self.refused_signature,
            RefusalReason::Expired => &self.refused_expired,
            RefusalReason::Audience => &self.refused_audience,
        }
        .inc();
    }
}
