//! Keeps the `keepd_key_*` gauges current: every minute, what
//! `keys::facts` says of every key (a rotation or a renewal shows within
//! a minute).

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::config::Config;
use crate::identity::NodeIdentity;
use crate::keys;
use crate::metrics::Metrics;
use crate::postgres::tls::Endpoint;
use crate::secrets::store::CredentialStore;
use crate::shutdown::Shutdown;

const EVERY: Duration = Duration::from_secs(60);

pub struct KeyGauges {
    pub config: Config,
    pub identity: Arc<NodeIdentity>,
    pub credentials: CredentialStore,
    pub superuser: Endpoint,
    pub metrics: Arc<Metrics>,
}

impl KeyGauges {
    pub async fn run(self, mut stop: Shutdown) {
        let mut database = keys::DatabaseFacts::default();
        let mut failing = false;
        loop {
            // Field keys rotate on their own: read every time.
            if let Ok(client) = self.superuser.connect().await {
                database = keys::DatabaseFacts::read(&client, &self.config).await;
            }
            match self.credentials.load(&self.identity) {
                Ok(Some((credentials, _))) => {
                    failing = false;
                    let facts = keys::facts(&self.config, &credentials, &database);
                    self.metrics
                        .set_keys(&keys::statuses(&facts, crate::clock::unix_now()));
                }
                Ok(None) => {}
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "key gauges: cannot read db.enc; the gauges keep their last values");
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
}
