//! Liveness: every admitted node stamps its row of `keepd.cluster_liveness`
//! every `EVERY`, and reads how many nodes were seen within `LIVE`. The count is how many nodes
//! share the per-account rate budget (`api::limits`): each enforces its
//! share, so an account gets its documented rate across the cluster.
//! A node that stops beating leaves the count within `LIVE`, and the
//! others take up its share.

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
/// the cluster stops beating and leaves the count within `LIVE`.
const BEAT: &str = "WITH me AS (INSERT INTO keepd.cluster_liveness (node_id, seen_at) \
         VALUES ($1, now()) ON CONFLICT (node_id) DO UPDATE SET seen_at = now() RETURNING 1) \
     SELECT count(*) FROM keepd.cluster_liveness \
     WHERE node_id = $1 OR seen_at > now() - make_interval(secs => $2)";

/// Beats as the superuser until `stop`, handing each count to `live`
/// (which it calls only when the count changes).
pub async fn run(superuser: Endpoint, node_id: String, live: impl Fn(u32), mut stop: Shutdown) {
    let mut client = None;
    let mut last = 0u32;
    let mut failing = false;
    loop {
        if client.is_none() {
            client = superuser.connect().await.ok();
        }
        let counted = match &client {
            Some(db) => db
                .query_one(BEAT, &[&node_id, &LIVE.as_secs_f64()])
                .await
                .map(|row| row.get::<_, i64>(0)),
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(EVERY) => continue,
                    _ = stop.requested() => return,
                }
            }
        };
        match counted {
            Ok(n) => {
                failing = false;
                let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
                if n != last {
                    info!(
                        nodes = n,
                        "cluster: live nodes share the per-account rate budget"
                    );
                    live(n);
                    last = n;
                }
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
