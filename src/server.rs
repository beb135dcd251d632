//! `serve`: wires the outbox, ingest, delivery, the sync lane, maintenance
//! and operator endpoints together, and shuts them down in the right order:
//! stop accepting, finish in-flight requests, settle, exit.

use crate::churnzero::client::ChurnZeroClient;
use crate::churnzero::mapping::MappingConfig;
use crate::config::Settings;
use crate::delivery::{self, DeliveryConfig, retry::RetryPolicy};
use crate::ingest::{self, IngestState, WriteKey};
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
            path: settings.database.display().to_string(),
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
        let mut workers = vec![tokio::spawn(maintenance(
            outbox.clone(),
            settings.maintenance_interval,
            settings.retention,
            delivery::held_budget(&delivery_config),
            shutdown_rx.clone(),
        ))];
        if settings.deliver {
            workers.push(tokio::spawn(delivery::run(
                outbox.clone(),
                client.clone(),
                mapping.clone(),
                delivery_config.clone(),
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
        let app = Router::new()
            .merge(ingest::router(IngestState {
                writer: outbox.writer.clone(),
                write_keys,
                mapping: mapping.clone(),
            }))
            .merge(operator::router(OperatorState {
                outbox: outbox.clone(),
                draining: draining.clone(),
                admin_token: settings.admin_token.clone(),
                metrics: operator::metrics_export::install(),
            }))
            .layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(30),
            ))
            .layer(CatchPanicLayer::new())
            .layer(TraceLayer::new_for_http());

        let mut http_shutdown = shutdown_rx.clone();
        let http = tokio::spawn(async move {
            let graceful = async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(%addr, database = %settings.database.display(), churnzero = %settings.churnzero_url,
            workers = settings.workers, batch_size = settings.batch_size, "churnzero-forwarder serving");
        Ok(Server {
            addr,
            shutdown: shutdown_tx,
            draining,
            http,
            workers,
        })
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
        tracing::info!("churnzero-forwarder stopped");
    }
}

async fn maintenance(
    outbox: Outbox,
    every: Duration,
    retention: Duration,
    held_budget: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match outbox.writer.maintain(retention, held_budget).await {
            Ok(r) => {
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

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The `serve` subcommand: bind, run until a signal, shut down gracefully.
pub async fn run(settings: Settings) -> Result<(), StartError> {
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: settings.listen,
                source,
            })?;
    let server = Server::start(settings, listener).await?;
    termination_signal().await;
    tracing::info!("shutdown requested: draining");
    server.shutdown().await;
    Ok(())
}
