//! The cluster root on this node: a new one the cluster made (`keepd
//! cluster rotate-key`) is adopted without a restart, within a heartbeat
//! of the rotation, and tokens are issued under it once every live node
//! holds it (until then under the previous root, which every node still
//! accepts).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::Api;
use crate::cluster::heartbeat::Beat;
use crate::cluster::{self, ClusterError, ClusterKey};
use crate::identity::NodeIdentity;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

pub struct RootWatch {
    pub api: Arc<Api>,
    pub identity: Arc<NodeIdentity>,
    pub superuser: Endpoint,
    /// `Layout::cluster_pin`: follows each adopted root.
    pub pin: PathBuf,
    pub held: ClusterKey,
    /// What the heartbeat says this node holds.
    pub generation: Arc<AtomicU32>,
}

impl RootWatch {
    pub async fn run(mut self, mut beats: watch::Receiver<Beat>, mut stop: Shutdown) {
        loop {
            tokio::select! {
                changed = beats.changed() => if changed.is_err() { return },
                _ = stop.requested() => return,
            }
            let beat = *beats.borrow_and_update();
            if beat.newest_generation > self.held.generation()
                && let Err(e) = self.adopt().await
            {
                warn!(error = %e, generation = beat.newest_generation, "cluster: cannot adopt the rotated cluster key; tried again at the next heartbeat");
            }
            if beat.lowest_generation >= self.held.generation()
                && self.api.issues_under_previous_root()
            {
                self.api.issue_under_current_root();
                info!(
                    generation = self.held.generation(),
                    "cluster: every live node holds the new cluster key; tokens are issued under it"
                );
            }
        }
    }

    async fn adopt(&mut self) -> Result<(), ClusterError> {
        let mut client = self.superuser.connect().await?;
        let Some(next) = cluster::successor(&mut client, &self.identity, &self.held).await? else {
            return Ok(());
        };
        cluster::check_pin(&next, &self.pin)?;
        self.api.rekey(&next);
        self.generation.store(next.generation(), Ordering::Release);
        info!(
            generation = next.generation(),
            fingerprint = next.fingerprint(),
            "cluster: adopted the rotated cluster key"
        );
        self.held = next;
        Ok(())
    }
}
