//! The writer task's loop: it drains queued requests into one transaction
//! (group commit), answers each after the commit, and when a group fails
//! retries its requests one by one so only the culprit gets the error.

use super::*;

pub(super) struct WriterTask {
    pub(super) conn: SqliteConnection,
    pub(super) config: WriterConfig,
    pub(super) stored: std::sync::Arc<Notify>,
    /// Disk space kept for delivery when the disk fills up (see reserve.rs).
    pub(super) reserve: Reserve,
    /// The ingest path's prepared statements (see direct.rs).
    pub(super) statements: StatementCache,
    /// Where maintenance's walk over held heads resumes (an event id).
    pub(super) held_cursor: i64,
}

impl WriterTask {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(GROUP_CAP);
        while let Some(first) = rx.recv().await {
            ops.push(first);
            while ops.len() < GROUP_CAP {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let (checkpoints, group): (Vec<Op>, Vec<Op>) = std::mem::take(&mut ops)
                .into_iter()
                .partition(|o| matches!(o, Op::Checkpoint { .. }));
            self.commit_group(group).await;
            for op in checkpoints {
                if let Op::Checkpoint { reply } = op {
                    let result = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .execute(&mut self.conn)
                        .await
                        .map(|_| ())
                        .map_err(db);
                    let _ = reply.send(result);
                }
            }
        }
        // Prepared statements must be finalized before the connection closes.
        if let Ok(_handle) = self.conn.lock_handle().await {
            self.statements.clear();
        }
        use sqlx::Connection;
        let _ = self.conn.close().await;
    }

    async fn commit_group(&mut self, ops: Vec<Op>) {
        let ops = self.refuse_ingest_while_full(ops).await;
        if ops.is_empty() {
            return;
        }
        let any_ingest = ops.iter().any(|o| matches!(o, Op::Ingest { .. }));
        let started = std::time::Instant::now();
        let result = self.transaction(&ops).await;
        let took = started.elapsed();
        metrics::histogram!("outbox_commit_duration_seconds").record(took.as_secs_f64());
        tracing::trace!(
            ops = ops.len(),
            us = took.as_micros() as u64,
            ok = result.is_ok(),
            "outbox commit"
        );
        match result {
            Ok(done) => {
                for (op, d) in ops.into_iter().zip(done) {
                    reply(op, Ok(d));
                }
                if any_ingest {
                    self.stored.notify_waiters();
                }
            }
            Err(e) if ops.len() == 1 => {
                self.release_reserve_if_full(&e).await;
                if let Some(op) = ops.into_iter().next() {
                    reply(op, Err(e));
                }
            }
            Err(e) => {
                self.release_reserve_if_full(&e).await;
                // One request's failure must not fail its neighbours: commit
                // each alone so only the culprit gets the error.
                for op in self.refuse_ingest_while_full(ops).await {
                    let single = [op];
                    let result = self.transaction(&single).await;
                    let [op] = single;
                    match result {
                        Ok(mut done) => reply(op, Ok(done.pop().expect("one result"))),
                        Err(e) => reply(op, Err(e)),
                    }
                }
                self.stored.notify_waiters();
            }
        }
    }

    /// While the disk reserve is released (the disk filled up), ingest is
    /// answered `Full` without touching the database, so that the room left
    /// goes to delivery; everything else goes ahead.
    async fn refuse_ingest_while_full(&mut self, ops: Vec<Op>) -> Vec<Op> {
        if !ops.iter().any(|o| matches!(o, Op::Ingest { .. }))
            || self.reserve.ready(&mut self.conn).await
        {
            return ops;
        }
        let mut rest = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Ingest { reply, .. } => drop(reply.send(Err(StoreError::Full(
                    "the disk is full; ingest resumes when space returns".into(),
                )))),
                other => rest.push(other),
            }
        }
        rest
    }

    async fn release_reserve_if_full(&mut self, e: &StoreError) {
        if matches!(e, StoreError::Full(_)) {
            self.reserve.release(&mut self.conn).await;
        }
    }

    async fn transaction(&mut self, ops: &[Op]) -> Result<Vec<Done>, StoreError> {
        if let Some(done) = self.plain_ingest_transaction(ops).await {
            return done;
        }
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await
            .map_err(StoreError::classify)?;
        let t0 = std::time::Instant::now();
        let applied = self.apply_all(ops).await;
        let t1 = t0.elapsed();
        match applied {
            Ok(done) => match sqlx::query("COMMIT").execute(&mut self.conn).await {
                Ok(_) => {
                    tracing::trace!(
                        apply_us = t1.as_micros() as u64,
                        commit_us = (t0.elapsed() - t1).as_micros() as u64,
                        "outbox transaction"
                    );
                    Ok(done)
                }
                Err(e) => {
                    let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                    Err(StoreError::classify(e))
                }
            },
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                Err(e)
            }
        }
    }

    /// The common group: only ingest (identity and audience updates
    /// included). BEGIN, the inserts and COMMIT then run under a single
    /// lock of the connection (one hand-off for the whole transaction).
    /// `None` when the group needs the general path.
    async fn plain_ingest_transaction(
        &mut self,
        ops: &[Op],
    ) -> Option<Result<Vec<Done>, StoreError>> {
        let mut requests: Vec<&[NewEvent]> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Ingest { events, .. } => requests.push(events.as_slice()),
                _ => return None,
            }
        }
        let now = now_ms();
        let mut handle = match self.conn.lock_handle().await {
            Ok(h) => h,
            Err(e) => return Some(Err(db(e))),
        };
        // SAFETY: the handle stays locked while `d` is used (to the end of
        // this function).
        let d = unsafe { Db::new(handle.as_raw_handle()) };
        let t0 = std::time::Instant::now();
        if let Err(e) = d.exec("BEGIN IMMEDIATE") {
            return Some(Err(e));
        }
        let result = insert_locked(&d, &mut self.statements, &self.config, &requests, now);
        let t1 = t0.elapsed();
        let result = result.and_then(|receipts| {
            d.exec("COMMIT")?;
            Ok(receipts)
        });
        match result {
            Ok(receipts) => {
                tracing::trace!(
                    apply_us = t1.as_micros() as u64,
                    commit_us = (t0.elapsed() - t1).as_micros() as u64,
                    "outbox transaction"
                );
                Some(Ok(receipts.into_iter().map(Done::Ingest).collect()))
            }
            Err(e) => {
                let _ = d.exec("ROLLBACK");
                Some(Err(e))
            }
        }
    }

    async fn apply_all(&mut self, ops: &[Op]) -> Result<Vec<Done>, StoreError> {
        let now = now_ms();
        let mut done = Vec::with_capacity(ops.len());
        // All ingest requests of the group share one insert pass.
        let ingest: Vec<&[NewEvent]> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Ingest { events, .. } => Some(events.as_slice()),
                _ => None,
            })
            .collect();
        let mut receipts = if ingest.is_empty() {
            Vec::new()
        } else {
            insert_events(
                &mut self.conn,
                &mut self.statements,
                &self.config,
                &ingest,
                now,
            )
            .await?
        }
        .into_iter();
        for op in ops {
            let d = match op {
                Op::Ingest { .. } => Done::Ingest(receipts.next().expect("receipt per request")),
                Op::Claim { max, lease, .. } => {
                    let t = std::time::Instant::now();
                    let c = claim(&mut self.conn, &mut self.statements, *max, *lease, now).await?;
                    tracing::trace!(us = t.elapsed().as_micros() as u64, n = c.len(), "op claim");
                    Done::Claim(c)
                }
                Op::Settle { items, .. } => {
                    let t = std::time::Instant::now();
                    if items
                        .iter()
                        .all(|s| matches!(s.outcome, SettleOutcome::Delivered))
                    {
                        settle_delivered(&mut self.conn, &mut self.statements, items, now).await?;
                    } else {
                        settle(&mut self.conn, &mut self.statements, items, now).await?;
                    }
                    tracing::trace!(
                        us = t.elapsed().as_micros() as u64,
                        n = items.len(),
                        "op settle"
                    );
                    Done::Unit
                }
                Op::Maintain {
                    retention,
                    held_budget,
                    ..
                } => Done::Maintain(
                    maintain(
                        &mut self.conn,
                        &self.config,
                        *retention,
                        *held_budget,
                        now,
                        &mut self.held_cursor,
                    )
                    .await?,
                ),
                Op::Replay { chunk, .. } => {
                    let (targets, next) = dead_targets(&mut self.conn, chunk).await?;
                    Done::Dead(replay(&mut self.conn, &targets, now).await?, next)
                }
                Op::Purge { chunk, .. } => {
                    let (targets, next) = dead_targets(&mut self.conn, chunk).await?;
                    Done::Dead(purge(&mut self.conn, &targets).await?, next)
                }
                Op::SetMeta { name, value, .. } => {
                    set_meta(&mut self.conn, name, value).await?;
                    Done::Unit
                }
                Op::NoteErrors { reports, .. } => {
                    crate::outbox::sqlite::recent_errors::record(&mut self.conn, reports, now)
                        .await?;
                    Done::Unit
                }
                Op::Audience { op, .. } => {
                    audience::apply(&mut self.conn, op).await?;
                    Done::Unit
                }
                // Taken out of every group before it commits (see run).
                Op::Checkpoint { .. } => Done::Unit,
            };
            done.push(d);
        }
        Ok(done)
    }
}

pub(super) fn reply(op: Op, result: Result<Done, StoreError>) {
    match (op, result) {
        (Op::Ingest { reply, .. }, Ok(Done::Ingest(r))) => drop(reply.send(Ok(r))),
        (Op::Ingest { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Claim { reply, .. }, Ok(Done::Claim(c))) => drop(reply.send(Ok(c))),
        (Op::Claim { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (
            Op::Settle { reply, .. } | Op::SetMeta { reply, .. } | Op::NoteErrors { reply, .. },
            Ok(Done::Unit),
        ) => drop(reply.send(Ok(()))),
        (
            Op::Settle { reply, .. } | Op::SetMeta { reply, .. } | Op::NoteErrors { reply, .. },
            Err(e),
        ) => drop(reply.send(Err(e))),
        (Op::Audience { reply, .. } | Op::Checkpoint { reply }, Ok(Done::Unit)) => {
            drop(reply.send(Ok(())))
        }
        (Op::Audience { reply, .. } | Op::Checkpoint { reply }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Maintain { reply, .. }, Ok(Done::Maintain(m))) => drop(reply.send(Ok(m))),
        (Op::Maintain { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Replay { reply, .. } | Op::Purge { reply, .. }, Ok(Done::Dead(n, next))) => {
            drop(reply.send(Ok((n, next))))
        }
        (Op::Replay { reply, .. } | Op::Purge { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        _ => unreachable!("operation and result kinds always match"),
    }
}
