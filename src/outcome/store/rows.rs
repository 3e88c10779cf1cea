//! A row of the records table (SQLite or PostgreSQL) back to a [`Record`].
//!
//! Rows are read as stored and checked only when they become records: a service type or code
//! this build does not know (a newer iotfwd wrote it) is then reported as
//! [`StoreError::Unreadable`] with the row's id, and only for rows a caller actually gets,
//! not for the one extra row a page reads to see whether another page follows.

use std::path::Path;

use super::StoreError;
use crate::outcome::{BizCode, Code, Record};

/// A row as stored, before its codes are checked.
pub(super) struct Stored {
    pub(super) id: i64,
    pub(super) time_ms: i64,
    pub(super) trace_id: String,
    message_id: String,
    product_key: String,
    device_name: String,
    biz_code: String,
    operation: String,
    code: i64,
    reason: String,
    content: String,
    tenant_id: String,
    instance_id: String,
}

pub(super) fn row_to_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    Ok(Stored {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        trace_id: r.get(2)?,
        message_id: r.get(3)?,
        product_key: r.get(4)?,
        device_name: r.get(5)?,
        biz_code: r.get(6)?,
        operation: r.get(7)?,
        code: r.get(8)?,
        reason: r.get(9)?,
        content: r.get(10)?,
        tenant_id: r.get(11)?,
        instance_id: r.get(12)?,
    })
}

pub(super) fn pg_row_to_stored(r: &tokio_postgres::Row) -> Result<Stored, tokio_postgres::Error> {
    Ok(Stored {
        id: r.try_get(0)?,
        time_ms: r.try_get(1)?,
        trace_id: r.try_get(2)?,
        message_id: r.try_get(3)?,
        product_key: r.try_get(4)?,
        device_name: r.try_get(5)?,
        biz_code: r.try_get(6)?,
        operation: r.try_get(7)?,
        code: r.try_get(8)?,
        reason: r.try_get(9)?,
        content: r.try_get(10)?,
        tenant_id: r.try_get(11)?,
        instance_id: r.try_get(12)?,
    })
}

impl Stored {
    pub(super) fn into_record(self, path: &Path) -> Result<Record, StoreError> {
        let unreadable = |what: String| StoreError::Unreadable {
            path: path.to_owned(),
            id: self.id,
            what,
        };
        let biz_code = BizCode::parse(&self.biz_code)
            .ok_or_else(|| unreadable(format!("service type {:?}", self.biz_code)))?;
        let code = u16::try_from(self.code)
            .ok()
            .and_then(Code::from_u16)
            .ok_or_else(|| unreadable(format!("code {}", self.code)))?;
        Ok(Record {
            time_ms: self.time_ms,
            trace_id: self.trace_id,
            message_id: self.message_id,
            product_key: self.product_key,
            device_name: self.device_name,
            biz_code,
            operation: self.operation,
            code,
            reason: self.reason,
            content: self.content,
            tenant_id: self.tenant_id,
            instance_id: self.instance_id,
        })
    }
}
