//! The checker: what the writer stored, against what every client received and was acked.

use std::collections::{BTreeSet, HashMap};

use chorus_e2e::Stack;
use chorus_protocol::RoomId;
use chorus_protocol::api::HistoryPage;

use crate::client::{ClientReport, Role, RoomRecord};

/// Every stored message of each room, in seq order, from the writer.
pub(crate) async fn read_history(
    stack: &Stack,
    rooms: &BTreeSet<RoomId>,
) -> anyhow::Result<HashMap<RoomId, Vec<(u64, String)>>> {
    let http = chorus_e2e::writer_http();
    let mut all = HashMap::new();
    for room in rooms {
        let mut messages: Vec<(u64, String)> = Vec::new();
        loop {
            let after = messages.last().map_or(0, |(seq, _)| *seq);
            let page: HistoryPage = http
                .get(format!(
                    "{}/v1/rooms/{room}/messages?after={after}&limit=500",
                    stack.writer.http()
                ))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            messages.extend(page.messages.iter().map(|m| (m.seq.0, m.id.to_string())));
            if page.messages.is_empty() || messages.last().is_some_and(|(s, _)| *s >= page.head.0) {
                break;
            }
        }
        all.insert(room.clone(), messages);
    }
    Ok(all)
}

#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    pub(crate) problems: Vec<String>,
}

impl Verdict {
    /// Every stored message after the client's first `joined`, once, in order, with the id the
    /// writer stored at that seq.
    pub(crate) fn check_client(
        &mut self,
        report: &ClientReport,
        room: &RoomId,
        record: &RoomRecord,
        stored: &[(u64, String)],
    ) {
        let Some(first) = record.first_joined else {
            self.problems
                .push(format!("{} never joined {room}", report.name));
            return;
        };
        let mut seen = BTreeSet::new();
        let (mut lost, mut duplicated, mut reordered, mut wrong) = (0u64, 0u64, 0u64, 0u64);
        let mut last = first;
        for (seq, id) in &record.received {
            if *seq <= first || !seen.insert(*seq) {
                duplicated += 1;
                continue;
            }
            if *seq < last {
                reordered += 1;
            }
            last = last.max(*seq);
            match stored.get((*seq as usize).wrapping_sub(1)) {
                Some((s, stored_id)) if s == seq && stored_id == id => {}
                _ => wrong += 1,
            }
        }
        lost += (first + 1..=stored.len() as u64)
            .filter(|s| !seen.contains(s))
            .count() as u64;
        // A message with another id at its seq is not the message that was stored there.
        lost += wrong;
        if lost + duplicated + reordered > 0 {
            let missing: Vec<u64> = (first + 1..=stored.len() as u64)
                .filter(|s| !seen.contains(s))
                .take(10)
                .collect();
            println!(
                "chaos: {} ({:?}, {room}, joined at {first}): lost={lost} (first missing {missing:?}; wrong ids {wrong}) duplicated={duplicated} reordered={reordered}",
                report.name,
                report.role.map(Role::name).unwrap_or_default(),
            );
        }
        if report.foreign > 0 && report.rooms.keys().next() == Some(room) {
            self.problems.push(format!(
                "{} received {} messages of rooms it was not in",
                report.name, report.foreign
            ));
        }
        self.lost += lost;
        self.duplicated += duplicated;
        self.reordered += reordered;
    }

    /// What the client's session dropped before the client saw it: duplicates and holes the
    /// gateway sent (the session re-joins from its position at a hole, so the client's record is
    /// in order whatever the gateway did) and messages of rooms it never joined. Each is a break
    /// of the gateway's promise, counted as the checker would have counted it in the record.
    pub(crate) fn check_session(&mut self, report: &ClientReport) {
        let stats = report.session;
        if stats.duplicates_dropped + stats.gaps_resynced > 0 {
            println!(
                "chaos: {} ({:?}): its session dropped {} duplicates and re-joined at {} holes",
                report.name,
                report.role.map(Role::name).unwrap_or_default(),
                stats.duplicates_dropped,
                stats.gaps_resynced,
            );
        }
        if stats.unknown_room_messages > 0 {
            self.problems.push(format!(
                "{} received {} messages of rooms it never joined",
                report.name, stats.unknown_room_messages
            ));
        }
        self.duplicated += stats.duplicates_dropped;
        self.reordered += stats.gaps_resynced;
    }

    /// The writer stored each acked send once, at the seq its ack named, and nothing else.
    pub(crate) fn check_store(
        &mut self,
        room: &RoomId,
        stored: &[(u64, String)],
        reports: &[ClientReport],
    ) {
        let dense = stored
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1);
        if !dense {
            self.problems
                .push(format!("{room}: stored seqs are not dense from 1"));
        }
        let acked: HashMap<&str, u64> = reports
            .iter()
            .flat_map(|r| r.acked.iter())
            .filter(|(_, room_of, _)| room_of == room)
            .map(|(id, _, seq)| (id.as_str(), *seq))
            .collect();
        let mut ids = BTreeSet::new();
        for (seq, id) in stored {
            if !ids.insert(id.as_str()) {
                // One send stored twice.
                self.duplicated += 1;
            }
            match acked.get(id.as_str()) {
                Some(acked_seq) if acked_seq == seq => {}
                Some(acked_seq) => self.problems.push(format!(
                    "{room}: {id} was acked with seq {acked_seq} but stored at {seq}"
                )),
                None => self.problems.push(format!(
                    "{room}: seq {seq} ({id}) was stored but never acked"
                )),
            }
        }
        let missing = acked.keys().filter(|id| !ids.contains(*id)).count() as u64;
        if missing > 0 {
            self.problems
                .push(format!("{room}: {missing} acked sends are not stored"));
            self.lost += missing;
        }
    }
}
