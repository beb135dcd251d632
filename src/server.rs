//! `serve`: wires the outbox, ingest, delivery, the sync lane, maintenance
//! and operator endpoints together, and shuts them down in the right order:
//! stop accepting, finish in-flight requests, settle, exit.

use crate::churnzero::client::ChurnZeroClient;
use crate::churnzero::mapping::MappingConfig;
use crate::config::Settings;
use crate::delivery::flow::{FlowControl, FlowSettings};
use crate::delivery::{self, DeliveryConfig, retry::RetryPolicy};
use crate::ingest::connections::{self, Admitted, Connections, Limits};
use crate::ingest::{self, BodyBudget, IngestState, WriteKey};
use crate::operator::{self, OperatorState};
use crate::outbox::{Outbox, WriterConfig};
use crate::sync_lane::{self, SyncConfig};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// How long a client may take to send a request's line and headers, counted
/// from the moment the server starts waiting for them (a fresh connection, or
/// an idle keep-alive one). A client that trickles headers, or connects and
/// sends nothing, loses its connection after this; it cannot hold a socket
/// and a task forever (slowloris). It is also the keep-alive idle limit, so
/// it sits above the 10-second flush interval of Segment's Node library: a
/// pooled connection is not closed just as the next batch is sent on it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest time one request may take from its headers to its answer, body
/// upload included: a client that trickles its body gets `408` and the
/// connection is closed. Ingest bounds the body read itself more tightly
/// ([`crate::ingest::BODY_READ_TIMEOUT`]) so that its refusal is a clear one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for open connections to finish their requests.
const CONNECTION_DRAIN: Duration = Duration::from_secs(35);

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Transparent: the mapping error already names the file and line, and
    /// printing it again as its own cause would repeat it.
    #[error(transparent)]
    Mapping(#[from] crate::churnzero::mapping::MappingError),
    #[error("opening the outbox at {path}: {source}")]
    Outbox {
        path: String,
        source: crate::outbox::StoreError,
    },
    #[error("building the ChurnZero client: {0}")]
    Client(#[from] reqwest::Error),
    /// Transparent: the TLS error names the file and its flag.
    #[error(transparent)]
    Tls(#[from] crate::ingest::tls::TlsError),
    #[error("installing the SIGTERM and SIGINT handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running server: its address and the handle that stops it.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    http: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    outbox: Outbox,
}

impl Server {
    /// Starts every part on an already-bound listener.
    pub async fn start(settings: Settings, listener: TcpListener) -> Result<Server, StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: settings.listen,
            source,
        })?;
        let mapping = Arc::new(match &settings.mapping {
            Some(path) => MappingConfig::load(path)?,
            None => MappingConfig::default(),
        });
        let tls = match &settings.listener.tls {
            Some(files) => Some(tokio_rustls::TlsAcceptor::from(
                crate::ingest::tls::server_config(files)?,
            )),
            None => None,
        };
        let connections = Connections::new(connection_limits(&settings));
        let body_budget = BodyBudget::new(settings.listener.max_body_memory);
        let outbox = Outbox::open(
            &settings.database,
            WriterConfig {
                dedup_window: settings.dedup_window,
                max_backlog: settings.max_backlog,
                release_leases_at_start: true,
            },
        )
        .await
        .map_err(|source| StartError::Outbox {
            path: crate::outbox::display_database(&settings.database),
            source,
        })?;
        let client = ChurnZeroClient::new(
            &settings.churnzero_url,
            settings.churnzero_app_key.clone(),
            settings.request_timeout,
        )?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));

        let delivery_config = DeliveryConfig {
            workers: settings.workers,
            batch_size: settings.batch_size,
            flush_interval: settings.flush_interval,
            request_timeout: settings.request_timeout,
            retry: RetryPolicy {
                initial: settings.retry_initial,
                max: settings.retry_max,
                budget: settings.retry_budget,
            },
        };
        let flow = FlowControl::new(FlowSettings {
            ceiling: settings.workers,
            adaptive: settings.adaptive_concurrency,
            max_actions_per_second: settings.max_actions_per_second,
            retry: delivery_config.retry,
        });
        let mut workers = vec![tokio::spawn(maintenance(
            outbox.clone(),
            settings.maintenance_interval,
            settings.retention,
            delivery::held_budget(&delivery_config),
            shutdown_rx.clone(),
        ))];
        if settings.deliver && settings.max_actions_per_second > 0 && outbox.is_shared() {
            workers.push(tokio::spawn(share_rate_cap(
                outbox.clone(),
                flow.clone(),
                shutdown_rx.clone(),
            )));
        }
        if settings.deliver {
            workers.push(tokio::spawn(delivery::run(
                outbox.clone(),
                client.clone(),
                mapping.clone(),
                delivery_config.clone(),
                flow.clone(),
                shutdown_rx.clone(),
            )));
            workers.push(tokio::spawn(sync_lane::run(
                outbox.clone(),
                client.clone(),
                mapping.clone(),
                SyncConfig {
                    interval: settings.sync_interval,
                    max_per_minute: settings.sync_max_per_minute,
                    batch_size: settings.batch_size,
                    retry: delivery_config.retry,
                },
                flow.clone(),
                shutdown_rx.clone(),
            )));
        }

        let write_keys = Arc::new(
            settings
                .write_keys
                .iter()
                .cloned()
                .map(WriteKey::new)
                .collect(),
        );
        let routes = Router::new()
            .merge(ingest::router(
                IngestState {
                    outbox: outbox.clone(),
                    write_keys,
                    mapping: mapping.clone(),
                    clients: Arc::new(ingest::ClientPolicy::new(&settings.clients)),
                },
                &settings.clients.cors_origins,
            ))
            .merge(operator::router(OperatorState {
                outbox: outbox.clone(),
                draining: draining.clone(),
                admin_token: settings.admin_token.clone(),
                metrics: operator::metrics_export::install(),
                flow: settings.deliver.then(|| flow.clone()),
            }))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed);
        let app = App::new(routes, body_budget);

        let scheme = if tls.is_some() { "https" } else { "http" };
        let limits = connections.limits().clone();
        let http = tokio::spawn(serve_http(
            listener,
            Listening {
                app,
                connections,
                tls,
            },
            shutdown_rx.clone(),
        ));
        tracing::info!(%addr, scheme, database = %crate::outbox::display_database(&settings.database), churnzero = %settings.churnzero_url,
            workers = settings.workers, adaptive_concurrency = settings.adaptive_concurrency,
            max_actions_per_second = settings.max_actions_per_second, batch_size = settings.batch_size,
            max_connections = limits.max, max_connections_per_client = limits.per_client,
            max_body_memory = settings.listener.max_body_memory,
            "churnzero-forwarder serving");
        Ok(Server {
            addr,
            shutdown: shutdown_tx,
            draining,
            http,
            workers,
            outbox,
        })
    }

    /// Turns `/readyz` to 503 while everything else keeps serving: the start
    /// of a shutdown delay, during which load balancers take this instance
    /// out of rotation before its listener closes.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops accepting, lets in-flight ingest and delivery finish (each
    /// ChurnZero request is bounded by its timeout) and returns.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
        for w in self.workers {
            let _ = w.await;
        }
        // Nothing writes any more: fold the WAL into the database so the
        // next start has nothing to read back.
        if let Err(e) = self.outbox.checkpoint().await {
            tracing::warn!(error = %e, "final WAL checkpoint failed; the next start recovers the WAL");
        }
        tracing::info!("churnzero-forwarder stopped");
    }
}

/// The connection budget: `--max-connections`, else what the open-file
/// limit leaves once raised to its hard value.
fn connection_limits(settings: &Settings) -> Limits {
    let files = match connections::raise_open_file_limit() {
        Ok(l) => {
            tracing::info!(
                soft_at_start = l.soft_before,
                soft = l.soft,
                hard = l.hard,
                "open-file limit"
            );
            Some(l.soft)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            None
        }
    };
    let max = match (settings.listener.max_connections, files) {
        (Some(max), Some(files)) => {
            let reserved = connections::RESERVED_FILES + 2 * settings.workers as u64;
            if max as u64 + reserved > files {
                tracing::warn!(
                    max_connections = max,
                    open_file_limit = files,
                    "--max-connections leaves little room under the open-file limit; \
                     accepting may fail with `Too many open files`"
                );
            }
            max
        }
        (Some(max), None) => max,
        (None, Some(files)) => connections::default_max_connections(files, settings.workers),
        (None, None) => connections::default_max_connections(1024, settings.workers),
    };
    Limits {
        max,
        per_client: settings.listener.max_connections_per_client,
        // Connections from trusted proxies carry many clients each and are
        // not capped per address.
        exempt: if settings.clients.trusted_proxies.is_empty() {
            None
        } else {
            let proxies = settings.clients.trusted_proxies.clone();
            Some(std::sync::Arc::new(move |ip: std::net::IpAddr| {
                proxies.contains(ip)
            }))
        },
    }
}

/// Longest time a client may take over its TLS handshake, counted from the
/// accepted connection: like the header deadline, it keeps a client that
/// connects and sends nothing from holding a place.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one HTTP/2 connection may carry at once; each may hold a body,
/// and all of them are under the body budget.
const HTTP2_MAX_STREAMS: u32 = 100;

/// What the accept loop needs besides the listener.
struct Listening {
    app: App,
    connections: Connections,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Every route behind the layers every request passes (outermost first):
/// the trace span, panics turned into 500s, the request deadline, and the
/// budget of body memory.
///
/// The layers wrap the router once, as one service, instead of through
/// `Router::layer`, which wraps every route in each layer and boxes it
/// again: a request then cloned every boxed level of the stack below each
/// level it passed (16 clones of boxed services a `/v1/track` request).
/// Wrapping once took a `/v1/track` request on PostgreSQL from about 127k
/// to 117k instructions (callgrind; see the README).
#[derive(Clone)]
struct App(
    tower::util::BoxCloneSyncService<
        axum::extract::Request<hyper::body::Incoming>,
        axum::response::Response,
        std::convert::Infallible,
    >,
);

impl App {
    fn new(routes: Router, body_budget: BodyBudget) -> App {
        let service = tower::ServiceBuilder::new()
            .map_request(|r: axum::extract::Request<hyper::body::Incoming>| {
                r.map(axum::body::Body::new)
            })
            .map_response(|r: axum::http::Response<_>| r.map(axum::body::Body::new))
            .layer(TraceLayer::new_for_http().make_span_with(ingest::trace_span))
            .layer(CatchPanicLayer::new())
            .layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                REQUEST_TIMEOUT,
            ))
            .layer(axum::middleware::from_fn_with_state(
                body_budget,
                ingest::limit_body_memory,
            ))
            .service(routes);
        App(tower::util::BoxCloneSyncService::new(service))
    }
}

/// The HTTP accept loop. It replaces `axum::serve` because that offers no
/// header read deadline and no connection budget. Each connection is first
/// admitted by [`Connections`] (a budget for all, a cap per client address;
/// a refused one is closed at once, so the listen backlog keeps moving),
/// then served by hyper with a timer:
///
/// - plain HTTP: HTTP/1.1 with [`HEADER_READ_TIMEOUT`], so a connection that
///   sends nothing, or headers a byte at a time, is closed when the deadline
///   passes. No HTTP/2 here: the version sniffing that serving both would
///   need reads the first bytes with no deadline at all;
/// - TLS: the handshake within [`TLS_HANDSHAKE_TIMEOUT`], then HTTP/2 or
///   HTTP/1.1 as ALPN chose (no sniffing). An HTTP/2 connection with no
///   request in service for [`HEADER_READ_TIMEOUT`] is closed, which is its
///   header and keep-alive deadline.
///
/// On shutdown it stops accepting, lets open requests finish (idle
/// connections close at once) and waits at most [`CONNECTION_DRAIN`].
async fn serve_http(listener: TcpListener, listening: Listening, shutdown: watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let listening = Arc::new(listening);
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or a connection reset before it was
                // accepted: neither is fatal; back off briefly (as axum does).
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = match listening.connections.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            peer,
            admitted,
            listening.clone(),
            graceful.watcher(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    if tokio::time::timeout(CONNECTION_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    listening: Arc<Listening>,
    watcher: hyper_util::server::graceful::Watcher,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

    let admitted = Arc::new(admitted);
    let service = {
        let admitted = admitted.clone();
        let app = listening.app.clone();
        let listening_tls = listening.tls.is_some();
        hyper::service::service_fn(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                let busy = admitted.busy();
                let extensions = request.extensions_mut();
                extensions.insert(axum::extract::ConnectInfo(peer));
                // The client address, the rate limit and the settings
                // endpoint's scheme come from the connection.
                extensions.insert(ingest::PeerInfo {
                    addr: peer,
                    tls: listening_tls,
                });
                let app = app.clone();
                async move {
                    let response = tower::ServiceExt::oneshot(app.0, request).await;
                    drop(busy);
                    response
                }
            },
        )
    };
    let Some(acceptor) = &listening.tls else {
        let conn = http1().serve_connection(TokioIo::new(stream), service);
        drive(watcher.watch(conn), &admitted, None, peer).await;
        return;
    };
    let handshake = tokio::select! {
        h = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => h,
        _ = admitted.evicted() => return,
        _ = shutdown.wait_for(|s| *s) => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not done within its deadline");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::ingest::tls::ALPN_H2);
    if h2 {
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(HTTP2_MAX_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        let conn = http2.serve_connection(TokioIo::new(stream), service);
        drive(
            watcher.watch(conn),
            &admitted,
            Some(HEADER_READ_TIMEOUT),
            peer,
        )
        .await;
    } else {
        let conn = http1().serve_connection(TokioIo::new(stream), service);
        drive(watcher.watch(conn), &admitted, None, peer).await;
    }
}

/// Most bytes a connection's read buffer (HTTP/1.1) or a request's header
/// list (HTTP/2) may hold. Segment's requests carry a few hundred bytes of
/// headers; hyper's default buffer of about 400 KB per connection would let
/// slow-header clients hold far more memory than their bodies may.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The HTTP/1.1 connection settings: the header deadline (also the
/// keep-alive idle limit) and a bounded read buffer.
fn http1() -> hyper::server::conn::http1::Builder {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    http1
}

/// Runs a connection until it ends, is chosen to make room, or (with
/// `idle_limit`) has had no request in service for that long.
async fn drive<E: std::fmt::Display>(
    conn: impl std::future::Future<Output = Result<(), E>>,
    admitted: &Admitted,
    idle_limit: Option<Duration>,
    peer: SocketAddr,
) {
    let idle = async {
        match idle_limit {
            None => std::future::pending::<()>().await,
            Some(limit) => loop {
                let idle_for = admitted.idle_for();
                if idle_for >= limit {
                    return;
                }
                tokio::time::sleep((limit - idle_for).max(Duration::from_millis(100))).await;
            },
        }
    };
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                // Header timeouts, resets and malformed requests end here:
                // the client's problem, not an operator's.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = admitted.evicted() => tracing::debug!(%peer, "idle connection closed to make room"),
        _ = idle => tracing::debug!(%peer, "idle connection closed"),
    }
}

async fn maintenance(
    outbox: Outbox,
    every: Duration,
    retention: Duration,
    held_budget: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pause = every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        pause = every;
        match outbox.maintain(retention, held_budget).await {
            Ok(r) => {
                if r.more_to_prune {
                    // Bounded batches, but as many as it takes to keep up.
                    pause = every.min(Duration::from_millis(200));
                }
                if r.leases_released > 0 || r.held_expired > 0 {
                    tracing::info!(
                        leases_released = r.leases_released,
                        held_expired = r.held_expired,
                        "maintenance"
                    );
                }
                tracing::debug!(
                    pruned_events = r.pruned_events,
                    pruned_message_ids = r.pruned_message_ids,
                    pages_vacuumed = r.pages_vacuumed,
                    "maintenance pass"
                );
            }
            Err(e) => tracing::warn!(error = %e, "maintenance pass failed"),
        }
    }
}

/// How often an instance re-counts the live instances for its share of the
/// rate cap: the heartbeat's period, so a change is seen within one beat.
const SHARE_EVERY: Duration = Duration::from_secs(2);

/// Keeps this instance's share of `--max-actions-per-second` at the cap
/// divided by the live instances (from their heartbeats), so that the
/// tenant's limit holds for all of them together. A starting instance
/// sends at 1 action/s until the others have had one heartbeat period to
/// count it; an instance that left stops counting after the instance
/// expiry, and meanwhile the others stay below the cap.
async fn share_rate_cap(
    outbox: Outbox,
    flow: Arc<FlowControl>,
    mut shutdown: watch::Receiver<bool>,
) {
    flow.set_share(u32::MAX);
    let mut pause = SHARE_EVERY + Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        pause = SHARE_EVERY;
        match outbox.live_instances().await {
            Ok(n) => flow.set_share(n),
            // Keep the last share: unreachable storage also pauses delivery.
            Err(e) => tracing::debug!(error = %e, "counting live instances failed"),
        }
    }
}

/// Unknown paths get a JSON reason like every other refusal.
async fn not_found(uri: axum::http::Uri) -> impl axum::response::IntoResponse {
    let body =
        serde_json::json!({ "success": false, "error": format!("no endpoint at {}", uri.path()) });
    (axum::http::StatusCode::NOT_FOUND, axum::Json(body))
}

/// A known path with the wrong method (a GET of /v1/track, say).
async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> impl axum::response::IntoResponse {
    let body = serde_json::json!({
        "success": false,
        "error": format!("{method} is not allowed on {}", uri.path()),
    });
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, axum::Json(body))
}

/// SIGTERM and SIGINT, caught from before the listener binds.
///
/// A handler installed only when the main task first awaits it leaves a
/// window after `/readyz` first answers 200 in which a SIGTERM takes the
/// default action: the process dies by the signal instead of draining.
/// Installing first closes that window; a signal during the start itself
/// ends the start (see [`run`]).
pub struct TerminationSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl TerminationSignals {
    /// Replaces the default actions of SIGTERM and SIGINT from now on.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on the next SIGTERM or SIGINT (or one that arrived since the
    /// last call).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The `serve` subcommand: bind, run until a signal, shut down gracefully.
pub async fn run(settings: Settings) -> Result<(), StartError> {
    let mut signals = TerminationSignals::install().map_err(StartError::Signals)?;
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: settings.listen,
                source,
            })?;
    let delay = settings.listener.shutdown_delay;
    // A signal while starting (a long migration, a database that is slow
    // to answer) stops the start instead of waiting for it: nothing has
    // been acknowledged that is not already committed, and a supervisor's
    // stop should not hang behind a start.
    let server = tokio::select! {
        started = Server::start(settings, listener) => started?,
        _ = signals.recv() => {
            tracing::info!("shutdown requested while starting: stopped before serving");
            return Ok(());
        }
    };
    signals.recv().await;
    if !delay.is_zero() {
        server.begin_draining();
        tracing::info!(
            delay = %humantime::format_duration(delay),
            "shutdown requested: /readyz answers 503 for the shutdown delay; ingest still serves"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = signals.recv() => tracing::info!("second signal: the shutdown delay is cut short"),
        }
    }
    tracing::info!("shutdown requested: draining");
    server.shutdown().await;
    Ok(())
}
