//! Shamir shares of the node identity (blahaj; see docs/dependencies.md
//! for why not sharks): `split` deals N shares of which any T rebuild the
//! 32-byte seed; `combine` rebuilds it, checks the result is the node the
//! shares name, and only then writes `identity.key`.
//!
//! A share file is text: a magic line, the node id, the shareholder, the
//! share's index, the threshold and count, the share in base64, and a
//! checksum over all of that, so a damaged or edited file is refused
//! instead of silently yielding a wrong key.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use blahaj::{Share, Sharks};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsutil;
use crate::identity::{IdentityError, NodeIdentity};

const MAGIC_LINE: &str = "keepd-recovery-share: v1";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("--threshold {threshold} with --shares {shares}: need 2 <= threshold <= shares <= 255")]
    Counts { shares: u32, threshold: u32 },
    #[error("{given} --shareholder names for {shares} shares: give one per share, or none")]
    Shareholders { given: usize, shares: u32 },
    #[error("shareholder {0:?} is named twice; each share goes to a different holder")]
    DuplicateShareholder(String),
    #[error("shareholder names are 1 to 64 letters, digits, '.', '_', '@' or '-'; {0:?} is not")]
    ShareholderName(String),
    #[error("{path} is not a keepd recovery share")]
    Foreign { path: PathBuf },
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} belongs to node {theirs}, {first} to node {ours}: combine shares of one node")]
    MixedNodes {
        path: PathBuf,
        theirs: String,
        first: PathBuf,
        ours: String,
    },
    #[error(
        "{path} was dealt with threshold {theirs}, {first} with {ours}: these shares are of different splits"
    )]
    MixedSplits {
        path: PathBuf,
        theirs: u32,
        first: PathBuf,
        ours: u32,
    },
    #[error("{path} and {other} are the same share (index {index}); bring {need} different shares")]
    Duplicate {
        path: PathBuf,
        other: PathBuf,
        index: u8,
        need: u32,
    },
    #[error("{have} share(s) given; this split needs {need}")]
    TooFew { have: usize, need: u32 },
    #[error(
        "the shares rebuild a key of node {got}, not node {expected}: at least one share is from \
         another split; nothing was written"
    )]
    WrongNode { expected: String, got: String },
    #[error("{path} exists; keepd never overwrites an identity key: move it away first")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// One share and what it belongs to.
pub struct ShareFile {
    pub node_id: String,
    pub shareholder: String,
    pub index: u8,
    pub threshold: u32,
    pub shares: u32,
    share: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ShareFile {{ node {}, holder {}, index {}, {} of {} }}",
            self.node_id, self.shareholder, self.index, self.threshold, self.shares
        )
    }
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..16])
}

impl ShareFile {
    fn body(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{MAGIC_LINE}\n\
             # One share of keepd node {node}'s identity key: any {t} of the {n} shares rebuild it\n\
             # with `keepd recovery combine`. Keep it apart from the other shares.\n\
             node-id: {node}\n\
             shareholder: {holder}\n\
             index: {index}\n\
             threshold: {t}\n\
             shares: {n}\n\
             share: {share}\n",
            node = self.node_id,
            holder = self.shareholder,
            index = self.index,
            t = self.threshold,
            n = self.shares,
            share = Zeroizing::new(BASE64.encode(self.share.as_slice())).as_str(),
        ))
    }

    /// The file's text, checksum last.
    pub fn encode(&self) -> Zeroizing<String> {
        let body = self.body();
        Zeroizing::new(format!("{}checksum: {}\n", body.as_str(), checksum(&body)))
    }

    pub fn parse(text: &str, path: &Path) -> Result<ShareFile, RecoveryError> {
        let corrupt = |reason: &str| RecoveryError::Corrupt {
            path: path.to_owned(),
            reason: reason.to_string(),
        };
        if text.lines().next() != Some(MAGIC_LINE) {
            return Err(RecoveryError::Foreign {
                path: path.to_owned(),
            });
        }
        let (body, sum) = text
            .trim_end()
            .rsplit_once("\nchecksum: ")
            .ok_or_else(|| corrupt("its checksum line is missing"))?;
        let body = format!("{body}\n");
        if checksum(&body) != sum.trim() {
            return Err(corrupt("its checksum does not match its contents"));
        }
        let field = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::trim)
                .ok_or_else(|| corrupt(&format!("the {name} line is missing")))
        };
        let number = |name: &str| {
            field(name)?
                .parse::<u32>()
                .map_err(|_| corrupt(&format!("{name} is not a number")))
        };
        let share = Zeroizing::new(
            BASE64
                .decode(field("share")?)
                .map_err(|_| corrupt("the share is not base64"))?,
        );
        let index = number("index")?;
        if share.len() != 33 || u32::from(share[0]) != index {
            return Err(corrupt("the share does not have the shape keepd writes"));
        }
        Ok(ShareFile {
            node_id: field("node-id")?.to_string(),
            shareholder: field("shareholder")?.to_string(),
            index: share[0],
            threshold: number("threshold")?,
            shares: number("shares")?,
            share,
        })
    }
}

fn valid_holder(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

/// Deals `shares` shares of `identity`'s seed, any `threshold` of which
/// rebuild it; shareholders are named by `holders` or numbered.
pub fn split(
    identity: &NodeIdentity,
    shares: u32,
    threshold: u32,
    holders: &[String],
) -> Result<Vec<ShareFile>, RecoveryError> {
    if !(2..=255).contains(&shares) || !(2..=shares).contains(&threshold) {
        return Err(RecoveryError::Counts { shares, threshold });
    }
    if !holders.is_empty() && holders.len() != shares as usize {
        return Err(RecoveryError::Shareholders {
            given: holders.len(),
            shares,
        });
    }
    let mut seen = BTreeSet::new();
    for holder in holders {
        if !valid_holder(holder) {
            return Err(RecoveryError::ShareholderName(holder.clone()));
        }
        if !seen.insert(holder) {
            return Err(RecoveryError::DuplicateShareholder(holder.clone()));
        }
    }
    let seed = identity.seed();
    let dealt: Vec<Share> = Sharks(threshold as u8)
        .dealer(seed.as_ref())
        .take(shares as usize)
        .collect();
    Ok(dealt
        .iter()
        .enumerate()
        .map(|(i, share)| {
            let bytes = Zeroizing::new(Vec::from(share));
            ShareFile {
                node_id: identity.node_id().to_string(),
                shareholder: holders
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("holder-{}", i + 1)),
                index: bytes[0],
                threshold,
                shares,
                share: bytes,
            }
        })
        .collect())
}

/// Rebuilds the identity from `shares` (with the paths they came from,
/// for messages), refusing anything that would not give this node's key.
pub fn combine(shares: &[(PathBuf, ShareFile)]) -> Result<NodeIdentity, RecoveryError> {
    let Some((first_path, first)) = shares.first() else {
        return Err(RecoveryError::TooFew { have: 0, need: 2 });
    };
    for (i, (path, share)) in shares.iter().enumerate() {
        if share.node_id != first.node_id {
            return Err(RecoveryError::MixedNodes {
                path: path.clone(),
                theirs: share.node_id.clone(),
                first: first_path.clone(),
                ours: first.node_id.clone(),
            });
        }
        if share.threshold != first.threshold || share.shares != first.shares {
            return Err(RecoveryError::MixedSplits {
                path: path.clone(),
                theirs: share.threshold,
                first: first_path.clone(),
                ours: first.threshold,
            });
        }
        if let Some((other, _)) = shares[..i].iter().find(|(_, s)| s.index == share.index) {
            return Err(RecoveryError::Duplicate {
                path: path.clone(),
                other: other.clone(),
                index: share.index,
                need: first.threshold,
            });
        }
    }
    if shares.len() < first.threshold as usize {
        return Err(RecoveryError::TooFew {
            have: shares.len(),
            need: first.threshold,
        });
    }
    let parsed: Vec<Share> = shares
        .iter()
        .map(|(path, s)| {
            Share::try_from(s.share.as_slice()).map_err(|_| RecoveryError::Corrupt {
                path: path.clone(),
                reason: "the share does not decode".into(),
            })
        })
        .collect::<Result<_, _>>()?;
    let seed = Zeroizing::new(
        Sharks(first.threshold as u8)
            .recover(&parsed)
            .map_err(|_| RecoveryError::TooFew {
                have: shares.len(),
                need: first.threshold,
            })?,
    );
    let seed: [u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| RecoveryError::WrongNode {
            expected: first.node_id.clone(),
            got: "(a key of the wrong length)".into(),
        })?;
    let seed = Zeroizing::new(seed);
    let identity = NodeIdentity::from_seed(&seed);
    if identity.node_id().as_str() != first.node_id {
        return Err(RecoveryError::WrongNode {
            expected: first.node_id.clone(),
            got: identity.node_id().to_string(),
        });
    }
    Ok(identity)
}

/// Writes one file per share into `dir` (0700; files 0600, never
/// overwriting); returns their paths.
pub fn write_shares(dir: &Path, shares: &[ShareFile]) -> Result<Vec<PathBuf>, RecoveryError> {
    fsutil::ensure_private_dir(dir).map_err(|source| RecoveryError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for share in shares {
        let path = dir.join(format!(
            "keepd-{}-share-{}-{}.txt",
            share.node_id, share.index, share.shareholder
        ));
        let write_err = |source| RecoveryError::Write {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(write_err)?;
        file.write_all(share.encode().as_bytes())
            .map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        paths.push(path);
    }
    fsutil::sync_dir(dir).map_err(|source| RecoveryError::Write {
        path: dir.to_owned(),
        source,
    })?;
    Ok(paths)
}

pub fn read_share(path: &Path) -> Result<ShareFile, RecoveryError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| RecoveryError::Read {
                path: path.to_owned(),
                source,
            })?,
        );
    ShareFile::parse(&text, path)
}

/// Writes the rebuilt identity to `path`, which must not exist.
pub fn restore(identity: &NodeIdentity, path: &Path) -> Result<(), RecoveryError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(RecoveryError::Exists {
            path: path.to_owned(),
        });
    }
    Ok(identity.write_new_at(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::identity::test_identity as identity;

    fn paths(shares: Vec<ShareFile>) -> Vec<(PathBuf, ShareFile)> {
        shares
            .into_iter()
            .enumerate()
            .map(|(i, s)| (PathBuf::from(format!("share{i}")), s))
            .collect()
    }

    #[test]
    fn every_three_of_five_rebuild_the_key() {
        let (_dir, id) = identity();
        let shares = split(&id, 5, 3, &[]).unwrap();
        let texts: Vec<_> = shares.iter().map(|s| s.encode()).collect();
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let chosen: Vec<_> = [a, b, c]
                        .iter()
                        .map(|&i| {
                            let path = PathBuf::from(format!("s{i}"));
                            let share = ShareFile::parse(&texts[i], &path).unwrap();
                            (path, share)
                        })
                        .collect();
                    let back = combine(&chosen).unwrap();
                    assert_eq!(back.node_id(), id.node_id(), "subset {a},{b},{c}");
                    assert_eq!(*back.seed(), *id.seed());
                }
            }
        }
    }

    #[test]
    fn refusals_are_named() {
        let (_dir, id) = identity();
        let (_other_dir, other) = identity();
        let shares = paths(split(&id, 5, 3, &[]).unwrap());
        let two: Vec<_> = shares
            .iter()
            .take(2)
            .map(|(p, s)| (p.clone(), ShareFile::parse(&s.encode(), p).unwrap()))
            .collect();
        assert!(matches!(
            combine(&two),
            Err(RecoveryError::TooFew { have: 2, need: 3 })
        ));

        let again = |i: usize| {
            let (p, s) = &shares[i];
            (p.clone(), ShareFile::parse(&s.encode(), p).unwrap())
        };
        let dup = vec![again(0), again(1), (PathBuf::from("copy"), again(0).1)];
        assert!(
            matches!(combine(&dup), Err(RecoveryError::Duplicate { index, .. }) if index == shares[0].1.index)
        );

        let foreign = paths(split(&other, 5, 3, &[]).unwrap());
        let mixed = vec![
            again(0),
            again(1),
            (
                foreign[2].0.clone(),
                ShareFile::parse(&foreign[2].1.encode(), &foreign[2].0).unwrap(),
            ),
        ];
        assert!(matches!(
            combine(&mixed),
            Err(RecoveryError::MixedNodes { .. })
        ));

        // Another split of the same node: same node id, shares disagree.
        let resplit = paths(split(&id, 5, 3, &[]).unwrap());
        let crossed = vec![
            again(0),
            again(1),
            (
                resplit[2].0.clone(),
                ShareFile::parse(&resplit[2].1.encode(), &resplit[2].0).unwrap(),
            ),
        ];
        match combine(&crossed) {
            Err(RecoveryError::WrongNode { .. }) | Err(RecoveryError::Duplicate { .. }) => {}
            other => panic!("crossed splits accepted: {other:?}"),
        }

        let text = shares[0].1.encode();
        let flipped = text.replacen("index: ", "index: 9", 1);
        assert!(matches!(
            ShareFile::parse(&flipped, Path::new("x")),
            Err(RecoveryError::Corrupt { .. })
        ));
        let damaged: String = text
            .lines()
            .map(|l| match l.strip_prefix("share: ") {
                Some(b64) => {
                    // Another base64 digit than the one there.
                    let last = if b64.ends_with('A') { 'B' } else { 'A' };
                    format!("share: {}{last}\n", &b64[..b64.len() - 1])
                }
                None => format!("{l}\n"),
            })
            .collect();
        assert!(matches!(
            ShareFile::parse(&damaged, Path::new("x")),
            Err(RecoveryError::Corrupt { .. })
        ));
        assert!(matches!(
            ShareFile::parse("hello", Path::new("x")),
            Err(RecoveryError::Foreign { .. })
        ));

        assert!(matches!(
            split(&id, 3, 4, &[]),
            Err(RecoveryError::Counts { .. })
        ));
        assert!(matches!(
            split(&id, 3, 1, &[]),
            Err(RecoveryError::Counts { .. })
        ));
        assert!(matches!(
            split(&id, 3, 2, &["a".into()]),
            Err(RecoveryError::Shareholders { .. })
        ));
        assert!(matches!(
            split(&id, 2, 2, &["a".into(), "a".into()]),
            Err(RecoveryError::DuplicateShareholder(_))
        ));
        assert!(matches!(
            split(&id, 2, 2, &["a".into(), "b/../c".into()]),
            Err(RecoveryError::ShareholderName(_))
        ));
    }

    #[test]
    fn shares_are_written_private_and_restored_without_overwriting() {
        let (dir, id) = identity();
        let shares = split(&id, 3, 2, &["ann".into(), "bob".into(), "cy".into()]).unwrap();
        let out = dir.path().join("shares");
        let written = write_shares(&out, &shares).unwrap();
        assert_eq!(written.len(), 3);
        for path in &written {
            assert_eq!(fsutil::mode_of(path).unwrap() & 0o777, 0o600);
            assert!(
                !std::fs::read_to_string(path)
                    .unwrap()
                    .contains(&BASE64.encode(id.seed().as_ref()))
            );
        }
        let back: Vec<_> = written[1..]
            .iter()
            .map(|p| (p.clone(), read_share(p).unwrap()))
            .collect();
        assert_eq!(back[0].1.shareholder, "bob");
        let rebuilt = combine(&back).unwrap();
        let target = dir.path().join("restored/identity.key");
        restore(&rebuilt, &target).unwrap();
        assert_eq!(NodeIdentity::load(&target).unwrap().node_id(), id.node_id());
        assert!(matches!(
            restore(&rebuilt, &target),
            Err(RecoveryError::Exists { .. })
        ));
    }
}
