//! The AMQP 1.0 endpoint consumer groups connect to (fe2o3-amqp's acceptor).
//!
//! Per socket: a pending slot ([`super::gate`]: `max_pending_connections`, `max_pending_per_ip`,
//! the per-IP failed-login limit), then within `subscription.handshake_timeout_ms` TLS when
//! configured, the protocol header, SASL PLAIN in the platform's signed format and the Open;
//! only then a `max_connections` slot, and the pending slot is given back. Then the
//! connection rules — the client's idle time-out must be 30–300 s (else 9601), its group must
//! have room (else 9600), and it must attach one receiving link within
//! `subscription.attach_timeout_ms`. The link then receives the group's deliveries until the
//! client goes away or the daemon stops (9602).
//!
//! The server does not enforce an idle time-out of its own (some clients send no heartbeats
//! on an idle link); TCP keepalive finds dead peers instead.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SessionAcceptor};
use fe2o3_amqp::types::definitions::{self, AmqpError, ConnectionError};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::performatives::Performative;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::auth::SignedPlain;
use super::frames::FrameScan;
use super::gate::{Gate, PendingSlot};
use super::{Group, Hub, Membership, Pending, Settlement};
use crate::config::subscription::SubscriptionConfig;
use crate::outcome::{ConnectionEvent, Outcomes, Record};

/// The accepted idle time-out range a client must announce, in ms.
pub const IDLE_TIMEOUT_RANGE: std::ops::RangeInclusive<u32> = 30_000..=300_000;

/// The TLS acceptor of `[subscription.tls]`, if configured (see [`crate::tls`]).
pub fn tls_acceptor(
    config: &crate::config::subscription::SubscriptionConfig,
) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let server = crate::tls::server_config("subscription", tls, &[])?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(server)))
}

/// Accepts consumer connections until `stop` turns true, then closes every open one with
/// 9602 and returns once they are closed.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    config: SubscriptionConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    outcomes: Outcomes,
    stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let gate = Gate::new(&config);
    let attach_timeout = Duration::from_millis(config.attach_timeout_ms);
    let handshake_timeout = Duration::from_millis(config.handshake_timeout_ms);
    let mut connections = tokio::task::JoinSet::new();
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            _ = super::stopped(&mut stopping) => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("AMQP 1.0 accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let now = tokio::time::Instant::now();
                let pending = match gate.admit(peer.ip(), now.into_std()) {
                    Ok(p) => p,
                    Err(refusal) => {
                        hub.metrics.endpoint_refused.with_label_values(&[refusal.label()]).inc();
                        // Logged at DEBUG only: a flood must not flood the log too.
                        tracing::debug!(%peer, reason = refusal.label(), "AMQP 1.0 socket closed before its handshake");
                        drop(socket);
                        continue;
                    }
                };
                let conn = Connection {
                    hub: Arc::clone(&hub),
                    outcomes: outcomes.clone(),
                    tls: tls.clone(),
                    attach_timeout,
                    handshake_due: now + handshake_timeout,
                    gate: Arc::clone(&gate),
                    slots: Arc::clone(&slots),
                    stop: stop.clone(),
                    ip: peer.ip(),
                    peer: peer.to_string(),
                };
                connections.spawn(conn.run(socket, pending));
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

struct Connection {
    hub: Arc<Hub>,
    outcomes: Outcomes,
    tls: Option<tokio_rustls::TlsAcceptor>,
    attach_timeout: Duration,
    /// When the handshake (TLS, protocol header, SASL, Open) must be over.
    handshake_due: tokio::time::Instant,
    gate: Arc<Gate>,
    /// The `max_connections` slots of logged-in connections.
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    ip: std::net::IpAddr,
    peer: String,
}

/// A socket wrapper that keeps a copy of what it reads until told to stop, so the client's
/// Open (and its idle time-out, which fe2o3 does not expose) can be decoded.
/// It also follows the frame boundaries ([`FrameScan`]) and ends the stream with an error at a
/// frame shorter than its header, which the AMQP library would panic on.
#[derive(Debug)]
struct Tap<S> {
    inner: S,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    scan: FrameScan,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && let Err(why) = this.scan.feed(&buf.filled()[before..])
        {
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
        if let Poll::Ready(Ok(())) = result
            && let Some(seen) = this
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
            && seen.len() < 1 << 16
        {
            seen.extend_from_slice(&buf.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The idle time-out of the first Open frame in `bytes` (the protocol headers and SASL frames
/// before it are skipped). `Some(None)`: an Open without an idle time-out.
pub fn open_idle_timeout(bytes: &[u8]) -> Option<Option<u32>> {
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.starts_with(b"AMQP") {
            pos += 8;
            continue;
        }
        if rest.len() < 8 {
            return None;
        }
        let size = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let doff = rest[4] as usize * 4;
        let kind = rest[5];
        if size < 8 || doff < 8 || doff > size || rest.len() < size {
            return None;
        }
        let body = &rest[doff..size];
        if kind == 0
            && !body.is_empty()
            && let Ok(Performative::Open(open)) = serde_amqp::from_slice::<Performative>(body)
        {
            return Some(open.idle_time_out);
        }
        pos += size;
    }
    None
}

fn error(
    condition: impl Into<definitions::ErrorCondition>,
    description: String,
) -> definitions::Error {
    definitions::Error::new(condition.into(), Some(description), None)
}

impl Connection {
    fn record(&self, group: &str, client: &str, event: ConnectionEvent, reason: String) -> Record {
        let tenant = self.hub.group(group).and_then(|g| g.config.tenant.clone());
        Record::group_connection(
            group,
            tenant.as_deref().unwrap_or_default(),
            client,
            &self.peer,
            event,
            reason,
        )
    }

    fn refused(&self, reason: &str) {
        self.hub
            .metrics
            .endpoint_refused
            .with_label_values(&[reason])
            .inc();
    }

    async fn run(self, socket: TcpStream, pending: PendingSlot) {
        let _ = socket.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive);
        match self.tls.clone() {
            None => self.serve(socket, pending).await,
            Some(tls) => {
                match tokio::time::timeout_at(self.handshake_due, tls.accept(socket)).await {
                    Ok(Ok(stream)) => self.serve(stream, pending).await,
                    Ok(Err(e)) => tracing::info!(peer = %self.peer, "TLS handshake failed: {e}"),
                    Err(_) => {
                        self.refused("handshake_timeout");
                        tracing::info!(peer = %self.peer, "TLS handshake timed out (subscription.handshake_timeout_ms)");
                    }
                }
            }
        }
    }

    async fn serve<S>(self, stream: S, pending: PendingSlot)
    where
        S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let seen = Arc::new(Mutex::new(Some(Vec::new())));
        let tap = Tap {
            inner: stream,
            seen: Arc::clone(&seen),
            scan: FrameScan::default(),
        };
        let result = Arc::new(OnceLock::new());
        let acceptor = ConnectionAcceptor::builder()
            .container_id("iotfwd")
            .sasl_acceptor(SignedPlain {
                verifier: Arc::clone(&self.hub.verifier),
                result: Arc::clone(&result),
            })
            .build();
        let accepted = tokio::time::timeout_at(self.handshake_due, acceptor.accept(tap)).await;
        let auth = result.get().cloned();
        let mut connection = match (accepted, auth) {
            (_, Some(Err(failure))) => {
                self.gate
                    .login_failed(self.ip, tokio::time::Instant::now().into_std());
                if failure.replayed {
                    self.refused("replayed");
                }
                let group = failure
                    .group
                    .as_deref()
                    .filter(|g| self.hub.group(g).is_some())
                    .unwrap_or("_unknown");
                self.hub
                    .metrics
                    .auth_failures
                    .with_label_values(&[group])
                    .inc();
                tracing::warn!(
                    peer = %self.peer,
                    group = failure.group.as_deref().unwrap_or(""),
                    client = failure.client_id.as_deref().unwrap_or(""),
                    "AMQP 1.0 login refused: {}",
                    failure.reason
                );
                return;
            }
            (Ok(Ok(c)), Some(Ok(_))) => c,
            (Ok(Err(e)), _) => {
                tracing::info!(peer = %self.peer, "AMQP 1.0 connection failed before open: {e}");
                return;
            }
            (Ok(Ok(_)), None) => {
                tracing::warn!(peer = %self.peer, "AMQP 1.0 connection without SASL refused");
                return;
            }
            (Err(_), _) => {
                self.refused("handshake_timeout");
                tracing::info!(peer = %self.peer, "AMQP 1.0 handshake timed out (subscription.handshake_timeout_ms)");
                return;
            }
        };
        // Logged in: from here the connection holds a max_connections slot, not a pending one.
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            drop(pending);
            self.refused("max_connections");
            tracing::warn!(peer = %self.peer, "AMQP 1.0 login refused: subscription.max_connections reached");
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                connection.close_with_error(error(
                    AmqpError::ResourceLimitExceeded,
                    "subscription.max_connections reached: try again later".into(),
                )),
            )
            .await;
            return;
        };
        drop(pending);
        let Some(Ok(user)) = result.get().cloned() else {
            unreachable!("matched above")
        };
        let captured = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        let group = Arc::clone(self.hub.group(&user.group).expect("verified group exists"));
        let client = user.client_id.clone();

        // Connection rules: idle time-out, then the group's connection limit.
        let idle = open_idle_timeout(&captured).flatten();
        if !idle.is_some_and(|ms| IDLE_TIMEOUT_RANGE.contains(&ms)) {
            let said = idle.map_or("none".to_owned(), |ms| format!("{ms} ms"));
            let reason = format!(
                "the client's idle time-out (heartbeat) is {said}; it must be 30000..=300000 ms"
            );
            self.refuse(
                &mut connection,
                &group,
                &client,
                ConnectionEvent::HeartbeatInvalid,
                reason,
                AmqpError::NotAllowed.into(),
            )
            .await;
            return;
        }
        let membership = match group.join(&client) {
            Ok(m) => m,
            Err(reason) => {
                self.refuse(
                    &mut connection,
                    &group,
                    &client,
                    ConnectionEvent::LimitReached,
                    reason,
                    ConnectionError::ConnectionForced.into(),
                )
                .await;
                return;
            }
        };
        tracing::info!(group = %group.config.id, %client, peer = %self.peer, idle_ms = idle.unwrap_or(0), "consumer connected");
        self.consume(connection, membership, &client).await;
    }

    async fn refuse(
        &self,
        connection: &mut fe2o3_amqp::acceptor::ListenerConnectionHandle,
        group: &Group,
        client: &str,
        event: ConnectionEvent,
        reason: String,
        condition: definitions::ErrorCondition,
    ) {
        let code = event.code();
        self.hub
            .metrics
            .refused
            .with_label_values(&[group.config.id.as_str(), &code.to_string()])
            .inc();
        tracing::warn!(group = %group.config.id, %client, peer = %self.peer, code = code.as_u16(), "consumer refused: {reason}");
        self.outcomes
            .record(self.record(&group.config.id, client, event, reason.clone()))
            .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close_with_error(error(condition, format!("{code}: {reason}"))),
        )
        .await;
    }

    /// Attach, then deliver until the client leaves or the daemon stops.
    async fn consume(
        &self,
        mut connection: fe2o3_amqp::acceptor::ListenerConnectionHandle,
        mut membership: Membership,
        client: &str,
    ) {
        let group = Arc::clone(&membership.group);
        let attach = async {
            let mut session = SessionAcceptor::new().accept(&mut connection).await?;
            let link = LinkAcceptor::new().accept(&mut session).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((session, link))
        };
        let (mut session, sender) = match tokio::time::timeout(self.attach_timeout, attach).await {
            Ok(Ok((session, LinkEndpoint::Sender(sender)))) => (session, sender),
            Ok(Ok((_, LinkEndpoint::Receiver(receiver)))) => {
                let reason =
                    "sending links are refused: consumers attach a receiving link".to_owned();
                let _ = receiver
                    .close_with_error(error(AmqpError::NotAllowed, reason.clone()))
                    .await;
                group.leave(&mut membership);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    connection.close_with_error(error(AmqpError::NotAllowed, reason)),
                )
                .await;
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(group = %group.config.id, client, "consumer left before attaching: {e}");
                group.leave(&mut membership);
                return;
            }
            Err(_) => {
                let reason = format!(
                    "no receiving link attached within {} ms",
                    self.attach_timeout.as_millis()
                );
                tracing::warn!(group = %group.config.id, client, "{reason}");
                group.leave(&mut membership);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    connection.close_with_error(error(AmqpError::NotAllowed, reason)),
                )
                .await;
                return;
            }
        };
        let ack_timeout = group.config.ack_timeout();
        let extra_links = LinkAcceptor::new();
        let mut pending = FuturesUnordered::new();
        let mut stop = self.stop.clone();
        let mut closed_by_server = false;
        // Sending runs in a task of its own, so that waiting for the consumer's link credit
        // never holds up settlements, ACK time-outs or shutdown here.
        let (results, mut sent) = mpsc::unbounded_channel();
        let (pause, paused) = watch::channel(false);
        let (halt, halted) = watch::channel(false);
        let rx = std::mem::replace(&mut membership.rx, mpsc::unbounded_channel().1);
        let send_task = tokio::spawn(send_loop(
            sender,
            rx,
            Arc::clone(&group),
            ack_timeout,
            results,
            paused,
            halted,
        ));
        // Rejected deliveries go to the rule's error action, which may retry for seconds:
        // at most REJECTS_IN_FLIGHT at a time per connection; beyond that the connection
        // takes no new deliveries until they are done (backpressure, nothing dropped).
        let rejects = Arc::new(Semaphore::new(REJECTS_IN_FLIGHT));
        let mut deferred: VecDeque<(Pending, Settlement)> = VecDeque::new();
        let settle_rejected = |p: Pending, how: Settlement, permit: OwnedSemaphorePermit| {
            let (group, id, client) = (Arc::clone(&group), membership.id, client.to_owned());
            tokio::spawn(async move {
                group.settle(id, &client, p, how).await;
                drop(permit);
            });
        };
        loop {
            tokio::select! {
                biased;
                _ = super::stopped(&mut stop) => {
                    closed_by_server = true;
                    break;
                }
                Some((p, how)) = pending.next(), if !pending.is_empty() => {
                    if matches!(how, Settlement::Rejected(_)) {
                        match Arc::clone(&rejects).try_acquire_owned() {
                            Ok(permit) => settle_rejected(p, how, permit),
                            Err(_) => {
                                deferred.push_back((p, how));
                                pause.send_replace(true);
                            }
                        }
                    } else {
                        group.settle(membership.id, client, p, how).await;
                    }
                }
                permit = Arc::clone(&rejects).acquire_owned(), if !deferred.is_empty() => {
                    let (p, how) = deferred.pop_front().expect("not empty");
                    settle_rejected(p, how, permit.expect("never closed"));
                    if deferred.is_empty() {
                        pause.send_replace(false);
                    }
                }
                link = extra_links.accept(&mut session) => match link {
                    Ok(LinkEndpoint::Sender(s)) => {
                        let _ = s.close_with_error(error(AmqpError::ResourceLimitExceeded, "one receiving link per connection".into())).await;
                    }
                    Ok(LinkEndpoint::Receiver(r)) => {
                        let _ = r.close_with_error(error(AmqpError::NotAllowed, "sending links are refused".into())).await;
                    }
                    Err(_) => break,
                },
                next = sent.recv() => {
                    let Some((p, result)) = next else { break };
                    match result {
                        Sent::Out(fut) => pending.push(await_outcome(p, fut, ack_timeout)),
                        Sent::TimedOut => {
                            group.settle(membership.id, client, p, Settlement::Timeout).await;
                        }
                        Sent::Failed(e) => {
                            tracing::info!(group = %group.config.id, client, "send failed ({e}); the consumer is gone");
                            group.settle(membership.id, client, p, Settlement::Lost).await;
                            break;
                        }
                    }
                }
            }
        }
        halt.send_replace(true);
        let (sender, rx) = match send_task.await {
            Ok(parts) => parts,
            Err(e) => panic!("the send loop of a consumer connection failed: {e}"),
        };
        membership.rx = rx;
        // What the send loop had in hand when it stopped.
        while let Ok((p, result)) = sent.try_recv() {
            match result {
                Sent::Out(fut) => pending.push(await_outcome(p, fut, ack_timeout)),
                Sent::TimedOut => {
                    group
                        .settle(membership.id, client, p, Settlement::Timeout)
                        .await
                }
                Sent::Failed(_) => {
                    group
                        .settle(membership.id, client, p, Settlement::Lost)
                        .await
                }
            }
        }
        for (p, how) in deferred.drain(..) {
            let permit = Arc::clone(&rejects)
                .acquire_owned()
                .await
                .expect("never closed");
            settle_rejected(p, how, permit);
        }
        // No more deliveries to this connection; what it had unsent goes back to the group.
        group.leave(&mut membership);
        if closed_by_server {
            let reason = "iotfwd is shutting down".to_owned();
            self.outcomes
                .record(self.record(
                    &group.config.id,
                    client,
                    ConnectionEvent::ServerClosed,
                    reason.clone(),
                ))
                .await;
            // Closing the link fails its unsettled deliveries at once; they are redelivered.
            let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), session.end()).await;
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                connection.close_with_error(error(
                    ConnectionError::ConnectionForced,
                    format!("9602: {reason}"),
                )),
            )
            .await;
        } else {
            // Let the session finish so outcomes the client sent just before closing count;
            // only then drop the link, which fails the deliveries still unsettled.
            let _ = tokio::time::timeout(Duration::from_millis(500), session.on_end()).await;
            drop(sender);
        }
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some((p, how)) = pending.next().await {
                let how = if closed_by_server
                    && how != Settlement::Accepted
                    && !matches!(how, Settlement::Rejected(_))
                {
                    Settlement::Lost
                } else {
                    how
                };
                group.settle(membership.id, client, p, how).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(group = %group.config.id, client, "unsettled deliveries did not resolve after the link closed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.on_close()).await;
        tracing::info!(group = %group.config.id, client, "consumer disconnected");
    }
}

/// Rejected deliveries whose error action runs at once, per consumer connection.
const REJECTS_IN_FLIGHT: usize = 16;

/// What became of one delivery the send loop took.
enum Sent {
    /// Sent; the consumer's outcome is on its way.
    Out(fe2o3_amqp::link::delivery::DeliveryFut<Result<Outcome, fe2o3_amqp::link::SendError>>),
    /// The ACK time-out passed while it waited for link credit.
    TimedOut,
    /// The link failed: the consumer is gone.
    Failed(String),
}

/// Takes this connection's deliveries and sends them, each as soon as the consumer grants
/// credit, within its ACK time-out (which runs from when the group handed it over). Pauses
/// while `paused` is true; stops when `halted` turns true or the group closes the channel.
/// Gives the link and the channel back, so the connection can close the one and return what
/// is left in the other.
async fn send_loop(
    mut sender: fe2o3_amqp::Sender,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    group: Arc<Group>,
    ack_timeout: Duration,
    results: mpsc::UnboundedSender<(Pending, Sent)>,
    mut paused: watch::Receiver<bool>,
    mut halted: watch::Receiver<bool>,
) -> (fe2o3_amqp::Sender, mpsc::UnboundedReceiver<Pending>) {
    loop {
        tokio::select! {
            biased;
            _ = halted.wait_for(|h| *h) => break,
            _ = paused.wait_for(|p| !*p) => {}
        }
        let p = tokio::select! {
            biased;
            _ = halted.wait_for(|h| *h) => break,
            next = rx.recv() => match next {
                Some(p) => p,
                None => break,
            },
        };
        let due = p.due(ack_timeout);
        let send = async {
            group.pace().await;
            sender.send_batchable(p.delivery.to_amqp()).await
        };
        let result = tokio::select! {
            biased;
            _ = halted.wait_for(|h| *h) => {
                // Never sent: it goes back to the group with the rest.
                let _ = results.send((p, Sent::Failed("the connection is closing".into())));
                break;
            }
            r = tokio::time::timeout_at(due, send) => r,
        };
        let failed = matches!(result, Ok(Err(_)));
        let sent = match result {
            Err(_) => Sent::TimedOut,
            Ok(Ok(fut)) => {
                group.delivered();
                Sent::Out(fut)
            }
            Ok(Err(e)) => Sent::Failed(e.to_string()),
        };
        if results.send((p, sent)).is_err() || failed {
            break;
        }
    }
    (sender, rx)
}

/// The consumer's outcome of one delivery, due by its ACK time-out.
async fn await_outcome(
    p: Pending,
    fut: fe2o3_amqp::link::delivery::DeliveryFut<Result<Outcome, fe2o3_amqp::link::SendError>>,
    ack_timeout: Duration,
) -> (Pending, Settlement) {
    let how = match tokio::time::timeout_at(p.due(ack_timeout), fut).await {
        Err(_) => Settlement::Timeout,
        Ok(Ok(Outcome::Accepted(_))) => Settlement::Accepted,
        Ok(Ok(Outcome::Released(_) | Outcome::Modified(_))) => Settlement::Released,
        Ok(Ok(Outcome::Rejected(r))) => {
            Settlement::Rejected(r.error.and_then(|e| e.description).unwrap_or_default())
        }
        #[allow(unreachable_patterns)]
        Ok(Ok(_)) => Settlement::Released,
        Ok(Err(_)) => Settlement::Lost,
    };
    (p, how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_timeout_is_read_from_the_open_frame() {
        use fe2o3_amqp::types::performatives::Open;
        let open = Open {
            container_id: "c".into(),
            hostname: None,
            max_frame_size: Default::default(),
            channel_max: Default::default(),
            idle_time_out: Some(60_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let body = serde_amqp::to_vec(&Performative::Open(open)).unwrap();
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        bytes.extend_from_slice(&[2, 0, 0, 0]);
        bytes.extend_from_slice(&body);
        assert_eq!(open_idle_timeout(&bytes), Some(Some(60_000)));
        assert_eq!(open_idle_timeout(&bytes[..bytes.len() - 1]), None);
        assert_eq!(open_idle_timeout(b"AMQP\x03\x01\x00\x00"), None);
    }

    /// The frames of `bytes` as the library's transport splits them: protocol headers skipped,
    /// each complete frame's bytes after its size, up to the first frame shorter than its
    /// header (then `Err` with its offset).
    fn split_frames(bytes: &[u8]) -> Result<Vec<&[u8]>, usize> {
        let (mut pos, mut frames) = (0, Vec::new());
        while pos + 4 <= bytes.len() {
            if bytes[pos..].starts_with(b"AMQP") {
                pos += 8;
                continue;
            }
            let size = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            if size < 8 {
                return Err(pos);
            }
            if pos + size > bytes.len() {
                break;
            }
            frames.push(&bytes[pos + 4..pos + size]);
            pos += size;
        }
        Ok(frames)
    }

    /// Robustness: protocol headers and frames (SASL init, Open, Begin, Close), mutated
    /// (sizes, data offsets, types, truncation, any bytes) and split into reads of any size:
    /// the frame scan refuses exactly the frames shorter than their header, the AMQP and SASL
    /// frame decoders of the library never panic on a frame it lets through, and the scan for
    /// the client's Open never panics (docs/security.md, "Robustness").
    #[test]
    fn robustness_amqp_frames() {
        use crate::robustness::{self, Raw};
        use fe2o3_amqp::frames::{amqp::FrameDecoder, sasl::FrameCodec};
        use fe2o3_amqp::types::performatives::{Begin, Close, Open};
        use proptest::prelude::*;
        use tokio_util::codec::Decoder;
        let open = Open {
            container_id: "c".into(),
            hostname: Some("h".into()),
            max_frame_size: Default::default(),
            channel_max: Default::default(),
            idle_time_out: Some(60_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Default::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let body = |p: Performative| serde_amqp::to_vec(&p).unwrap();
        let frame = |kind: u8, body: &[u8]| {
            let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&[2, kind, 0, 0]);
            f.extend_from_slice(body);
            f
        };
        let sasl_init = b"\x00\x53\x41\xc0\x0a\x02\xa3\x05PLAIN\xa0\x00";
        let seed = [
            b"AMQP\x03\x01\x00\x00".to_vec(),
            frame(1, sasl_init),
            b"AMQP\x00\x01\x00\x00".to_vec(),
            frame(0, &body(Performative::Open(open))),
            frame(0, &body(Performative::Begin(begin))),
            frame(0, &body(Performative::Close(Close { error: None }))),
        ]
        .concat();
        assert_eq!(open_idle_timeout(&seed), Some(Some(60_000)));
        let input = prop_oneof![
            8 => robustness::mutated_bytes(
                vec![seed.clone(), seed[8..].to_vec(), seed[27..].to_vec()],
                &[
                    b"\x00\x00\x00\x08",
                    b"\x00\x00\x00\x04",
                    b"\x00\x00\x00\x09\x02\x00\x00\x00",
                    b"\xff\xff\xff\xff",
                    b"\x02\x00",
                    b"\x02\x01",
                    b"\x00\x53\x10",
                    b"\x00\x53\x11",
                    b"\x00\x53\x18",
                    b"\x00\x53\x41",
                    b"\xb0\x7f\xff\xff\xff",
                    b"\xd0\xff\xff\xff\xff",
                    b"AMQP",
                ],
            ),
            1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Raw),
        ];
        let seen = robustness::Seen::default();
        robustness::run(
            "amqp-frames",
            3000,
            (input, 1..64usize),
            |(Raw(bytes), chunk)| {
                let _ = open_idle_timeout(&bytes);
                let mut scan = FrameScan::default();
                let refused = bytes.chunks(chunk).find_map(|part| scan.feed(part).err());
                let frames = match (split_frames(&bytes), refused) {
                    (Ok(frames), None) => frames,
                    (Err(_), Some(_)) => {
                        seen.count("refused");
                        return Ok(());
                    }
                    (expected, got) => {
                        return Err(format!(
                            "the scan gave {got:?}, the frames are {expected:?}"
                        ));
                    }
                };
                for f in frames {
                    let amqp = FrameDecoder {}.decode(&mut bytes::BytesMut::from(f));
                    let sasl = FrameCodec {}.decode(&mut bytes::BytesMut::from(f));
                    seen.count(match (amqp.is_ok(), sasl.is_ok()) {
                        (true, _) => "amqp-frame",
                        (_, true) => "sasl-frame",
                        _ => "undecodable-frame",
                    });
                }
                Ok(())
            },
        );
        seen.print("amqp-frames");
    }
}
