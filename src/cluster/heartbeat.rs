//! Liveness: every admitted node stamps its row of `keepd.cluster_liveness`
//! every `EVERY` with the generation of the cluster root it holds, and
//! reads how many nodes were seen within `LIVE`, the lowest generation
//! they hold and the newest the cluster made. The count is how many nodes
//! share the per-account rate budget (`api::limits`): each enforces its
//! share, so an account gets its documented rate across the cluster. A
//! node that stops beating leaves the count within `LIVE`, and the others
//! take up its share. The generations tell `daemon::root` when to adopt a
//! new root and when every live node holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::postgres::describe_error;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

/// How often a node says it is alive.
pub const EVERY: Duration = Duration::from_secs(5);
/// A node not seen for this long is no longer counted.
pub const LIVE: Duration = Duration::from_secs(15);

/// Marks this node seen and counts the nodes seen lately, itself included
/// (the statement's snapshot predates its own write). A node removed from
/// the cluster is not counted, whether or not it still beats.
const BEAT: &str = "WITH me AS (INSERT INTO keepd.cluster_liveness \
         (node_id, seen_at, key_generation) VALUES ($1, now(), $3) \
         ON CONFLICT (node_id) DO UPDATE SET seen_at = now(), key_generation = $3 RETURNING 1), \
     live AS (SELECT CASE WHEN node_id = $1 THEN $3 ELSE key_generation END AS generation \
         FROM keepd.cluster_liveness l \
         WHERE (node_id = $1 OR seen_at > now() - make_interval(secs => $2)) \
           AND NOT EXISTS (SELECT 1 FROM keepd.cluster_removals r WHERE r.node_id = l.node_id)) \
     SELECT count(*), least(min(generation), $3), \
            greatest((SELECT max(generation) FROM keepd.cluster_key_log), 1) FROM live";

/// The lowest cluster root generation a live member holds, as their last
/// heartbeats said (1 when none beat yet); a removed node that still
/// beats does not count.
pub async fn lowest_live_generation(
    client: &tokio_postgres::Client,
) -> Result<u32, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(min(key_generation), 1) FROM keepd.cluster_liveness l \
             WHERE seen_at > now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM keepd.cluster_removals r \
                               WHERE r.node_id = l.node_id)",
            &[&LIVE.as_secs_f64()],
        )
        .await?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(1))
}

/// What one beat read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Beat {
    /// Live nodes, this one included.
    pub nodes: u32,
    /// The lowest root generation a live node holds.
    pub lowest_generation: u32,
    /// The newest generation the cluster made.
    pub newest_generation: u32,
}

/// Beats as the superuser until `stop`, saying it holds `generation`,
/// and hands each beat to `beat`.
pub async fn run(
    superuser: Endpoint,
    node_id: String,
    generation: Arc<AtomicU32>,
    beat: impl Fn(Beat),
    mut stop: Shutdown,
) {
    let mut client = None;
    let mut last = 0u32;
    let mut failing = false;
    loop {
        if client.is_none() {
            client = superuser.connect().await.ok();
        }
        let held = generation.load(Ordering::Acquire) as i32;
        let counted = match &client {
            Some(db) => db
                .query_one(BEAT, &[&node_id, &LIVE.as_secs_f64(), &held])
                .await
                .map(|row| {
                    let generation = |i| u32::try_from(row.get::<_, i32>(i)).unwrap_or(1);
                    Beat {
                        nodes: u32::try_from(row.get::<_, i64>(0))
                            .unwrap_or(u32::MAX)
                            .max(1),
                        lowest_generation: generation(1),
                        newest_generation: generation(2),
                    }
                }),
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(EVERY) => continue,
                    _ = stop.requested() => return,
                }
            }
        };
        match counted {
            Ok(read) => {
                failing = false;
                if read.nodes != last {
                    info!(
                        nodes = read.nodes,
                        "cluster: live nodes share the per-account rate budget"
                    );
                    last = read.nodes;
                }
                beat(read);
            }
            Err(e) => {
                client = None;
                if !failing {
                    warn!(error = %describe_error(&e), "cluster: cannot record this node as live; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.requested() => return,
        }
    }
}
