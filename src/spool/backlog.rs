//! Consumer-group backlogs in the spool, for a daemon without a broker: each message a group
//! holds for its consumers is a row until a consumer settles it for good, so a restart (or
//! kill -9) loses nothing that was answered with 200. The group keeps its own copy in memory
//! to schedule deliveries; the spool only has to remember, and is read back at start.
//!
//! Rows are opaque bytes: the group decides how a delivery is encoded.

use super::{Spool, SpoolError};

/// One stored backlog entry: its row id and the group's bytes.
pub type Entry = (i64, Vec<u8>);

impl Spool {
    /// Stores one message of group `group`; returns its row id once committed (inserts of a
    /// burst share a commit).
    pub async fn push_backlog(&self, group: &str, item: Vec<u8>) -> Result<i64, SpoolError> {
        use rusqlite::types::Value as V;
        self.write(
            "INSERT INTO group_backlog (group_id, time_ms, delivery) VALUES (?1, ?2, ?3)",
            vec![
                V::Text(group.to_owned()),
                V::Integer(crate::message::now_ms()),
                V::Blob(item),
            ],
        )
        .await
    }

    /// Forgets entry `id` (settled for good, or expired). Not waited for: should a crash
    /// undo it, the entry is delivered once more, never lost.
    pub fn remove_backlog(&self, id: i64) {
        self.write_later("DELETE FROM group_backlog WHERE id = ?1", vec![id.into()]);
    }

    /// Every group with entries, by id, with how many it has.
    pub async fn backlog_groups(&self) -> Result<Vec<(String, i64)>, SpoolError> {
        self.read(|spool, conn| {
            let mut stmt = conn
                .prepare("SELECT group_id, count(*) FROM group_backlog GROUP BY group_id ORDER BY group_id")
                .map_err(|e| spool.sqlite(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| spool.sqlite(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| spool.sqlite(e))
        })
        .await
    }

    /// Every entry of `group`, oldest first, with when it was stored (ms since the epoch).
    pub async fn backlog(&self, group: &str) -> Result<Vec<(i64, i64, Vec<u8>)>, SpoolError> {
        let group = group.to_owned();
        self.read(move |spool, conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, time_ms, delivery FROM group_backlog WHERE group_id = ?1 ORDER BY id",
                )
                .map_err(|e| spool.sqlite(e))?;
            let rows = stmt
                .query_map([group], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| spool.sqlite(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| spool.sqlite(e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backlog_entries_survive_reopening_in_order_and_removed_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = Spool::path_in(dir.path());
        let spool = Spool::open(&path).unwrap();
        let mut ids = Vec::new();
        for n in 0..5u8 {
            ids.push(spool.push_backlog("g", vec![n]).await.unwrap());
        }
        spool.push_backlog("other", vec![9]).await.unwrap();
        spool.remove_backlog(ids[1]);
        // A committed write after the removal: the removal is committed too.
        spool.push_backlog("other", vec![10]).await.unwrap();
        drop(spool);
        let spool = Spool::open(&path).unwrap();
        let items: Vec<Vec<u8>> = spool
            .backlog("g")
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, item)| item)
            .collect();
        assert_eq!(items, [vec![0], vec![2], vec![3], vec![4]]);
        assert_eq!(spool.backlog("other").await.unwrap().len(), 2);
        assert_eq!(
            spool.backlog_groups().await.unwrap(),
            [("g".to_owned(), 4), ("other".to_owned(), 2)]
        );
    }
}
