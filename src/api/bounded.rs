//! Bounded work per client: how many record-store reads run at once and for how long
//! (`store.max_concurrent_queries`, `store.query_timeout_ms`), and how long a client may take
//! to send a request body (`http.body_timeout_ms`).
//!
//! A keyword query may scan with several threads, so without a bound a few clients could hold
//! every core. A read beyond the limit is refused at once with 429 rather than queued: a
//! queue would only hide the overload from the client. A read that outlives its time-out is
//! answered 503 and cancelled: [`crate::outcome::store::Cancel`] interrupts the SQLite
//! statements of a log query, a trace or a stats read, and sends PostgreSQL a cancel request for
//! the connection its statement runs on. Either way it keeps its slot until it has really
//! stopped, which keeps the bound true.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use crate::config::store::StoreConfig;
use crate::outcome::store::Cancel;
use crate::source::http::json_error;
use crate::telemetry::Metrics;

/// The slots of record-store reads.
pub struct QueryGate {
    slots: Arc<Semaphore>,
    max: usize,
    timeout: Duration,
}

impl QueryGate {
    pub fn new(store: &StoreConfig) -> QueryGate {
        QueryGate {
            slots: Arc::new(Semaphore::new(store.max_concurrent_queries)),
            max: store.max_concurrent_queries,
            timeout: Duration::from_millis(store.query_timeout_ms),
        }
    }

    /// Runs the blocking read `work` on the blocking pool when a slot is free: its result, or
    /// the response to answer instead (429 no slot, 503 time-out, 500 the read panicked).
    /// `work` reads through a reader made [`crate::outcome::store::Reader::cancellable`] with
    /// the [`Cancel`] it is given, which is cancelled at the time-out.
    pub async fn run<T: Send + 'static>(
        &self,
        metrics: &Metrics,
        work: impl FnOnce(Cancel) -> T + Send + 'static,
    ) -> Result<T, Response> {
        let limited = |limit: &str| {
            metrics.http_limited.with_label_values(&[limit]).inc();
        };
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            limited("max_concurrent_queries");
            return Err(json_error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} record-store queries are running, the most at once \
                     (store.max_concurrent_queries); retry when one has finished",
                    self.max
                ),
            ));
        };
        let cancel = Cancel::default();
        // Cancels the read unless it answered: at the time-out, and also when the request
        // goes away first (its client hung up), so no read outlives the one who asked.
        let mut stop = CancelOnDrop(Some(cancel.clone()));
        let task = tokio::task::spawn_blocking(move || {
            let result = work(cancel);
            drop(slot);
            result
        });
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(value)) => {
                stop.0 = None;
                Ok(value)
            }
            Ok(Err(e)) => Err(json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the query failed: {e}"),
            )),
            Err(_) => {
                drop(stop);
                limited("query_timeout_ms");
                Err(json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the query took longer than {} ms (store.query_timeout_ms); \
                         narrow it (a shorter time range, a device or a trace id) and retry",
                        self.timeout.as_millis()
                    ),
                ))
            }
        }
    }
}

/// Cancels its read when dropped, unless disarmed (set to `None`).
struct CancelOnDrop(Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
        }
    }
}

/// Reads the whole request body within `timeout` before the handler runs, so a client that
/// sends its body slowly holds a connection for at most that long: 408, counted under
/// `body_timeout_ms`. A body over `max_bytes` is 413 here already.
pub async fn read_body_within(
    State((metrics, timeout, max_bytes)): State<(Arc<Metrics>, Duration, usize)>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            if too_large {
                json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {max_bytes} bytes (http.max_body_bytes)"),
                )
            } else {
                json_error(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                )
            }
        }
        Err(_) => {
            metrics
                .http_limited
                .with_label_values(&["body_timeout_ms"])
                .inc();
            let mut response = json_error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms (http.body_timeout_ms)",
                    timeout.as_millis()
                ),
            );
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, timeout_ms: u64) -> QueryGate {
        QueryGate::new(&StoreConfig {
            max_concurrent_queries: max,
            query_timeout_ms: timeout_ms,
            ..StoreConfig::default()
        })
    }

    #[tokio::test]
    async fn a_read_beyond_the_limit_is_429_and_a_slow_one_503() {
        let metrics = Metrics::new();
        let gate = Arc::new(gate(1, 100));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let g = Arc::clone(&gate);
        let m = Arc::new(Metrics::new());
        let m2 = Arc::clone(&m);
        let slow = tokio::spawn(async move {
            g.run(&m2, move |cancel| {
                // Stands for a read that stops when cancelled: waits for the test's word.
                let _ = wait.recv();
                drop(cancel);
                7
            })
            .await
        });
        // The slow read holds the one slot.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = gate.run(&metrics, |_| 1).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let timed_out = slow.await.unwrap().unwrap_err();
        assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Its slot is held until the read really ends.
        assert_eq!(
            gate.run(&metrics, |_| 1).await.unwrap_err().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        release.send(()).unwrap();
        let mut answered = None;
        for _ in 0..100 {
            if let Ok(v) = gate.run(&metrics, |_| 2).await {
                answered = Some(v);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(answered, Some(2));
        let count = |m: &Metrics, l: &str| m.http_limited.with_label_values(&[l]).get();
        assert!(count(&metrics, "max_concurrent_queries") >= 2);
        assert_eq!(count(&m, "query_timeout_ms"), 1);
    }

    /// Whether a read gets a slot of `gate` within `within` (the read that held it stopped).
    async fn slot_frees(gate: &QueryGate, metrics: &Metrics, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if gate.run(metrics, |_| ()).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// On PostgreSQL a read that outlives the time-out is answered 503 as on SQLite, and its
    /// statement is cancelled on the server: the slot is free again while the lock the
    /// statement waited for is still held (without the cancel request it would wait for it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timed_out_stats_read_on_postgres_stops_on_the_server() {
        use crate::outcome::stats::{GroupBy, StatsQuery, stats};
        use crate::outcome::store::testing::{Backend, filled_on};
        let dir = tempfile::tempdir().unwrap();
        let Some((store, reader, Some(db))) = filled_on(Backend::Postgres, dir.path(), 5).await
        else {
            return;
        };
        let metrics = Metrics::new();
        let gate = gate(1, 200);
        let lock = db.lock_records();
        let now = crate::message::now_ms();
        let query = StatsQuery {
            from_ms: now - 3_600_000,
            to_ms: now,
            bucket_ms: 60_000,
            by: GroupBy::Code,
            status: None,
            service_type: None,
        };
        let answer = gate
            .run(&metrics, move |cancel| {
                stats(&reader.cancellable(cancel), &query, None, now).map(|s| s.total)
            })
            .await
            .unwrap_err();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            slot_frees(&gate, &metrics, Duration::from_secs(5)).await,
            "the timed-out statement still runs on the server"
        );
        assert_eq!(db.running_statements(), 0);
        drop(lock);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_read_is_cancelled_at_the_time_out_and_when_its_request_goes_away() {
        let metrics = Arc::new(Metrics::new());
        // Stands for a store read: runs until cancelled.
        let until_cancelled = |cancel: Cancel| {
            while !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(2));
            }
            "stopped"
        };
        let quick = gate(1, 100);
        let answer = quick.run(&metrics, until_cancelled).await.unwrap_err();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The request that asked goes away (its client hung up) before the time-out.
        let slow = Arc::new(gate(1, 60_000));
        let (g, m) = (Arc::clone(&slow), Arc::clone(&metrics));
        let request = tokio::spawn(async move { g.run(&m, until_cancelled).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        request.abort();
        let _ = request.await;
        // Its read stops and frees the slot.
        assert!(
            slot_frees(&slow, &metrics, Duration::from_secs(1)).await,
            "the read of a request that went away still holds its slot"
        );
    }
}
