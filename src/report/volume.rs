//! The block device under a directory, as the kernel runs it: whether it
//! is a dm-crypt volume (the mapping itself or one below it, as with LVM
//! on LUKS) and, where the device-mapper table can be read, its cipher and
//! key size. keepd does not create or open volumes; it measures the one
//! the operator built (docs/operations.md, "Encryption at rest").
//!
//! sysfs says which mapping is dm-crypt (`dm/uuid` starts with `CRYPT-`)
//! to anyone; the table (cipher, key) needs the device-mapper ioctl, which
//! only root may use: `dmsetup table` does it, and `keepd report` run as
//! root shows what the daemon, running as keepd's user, cannot read.
//!
//! dm-crypt, sysfs and dmsetup are Linux's: elsewhere the volume is not
//! measured (`Volume::Unknown`, saying so).

#[cfg(target_os = "linux")]
use std::os::unix::fs::MetadataExt;
use std::path::Path;
#[cfg(target_os = "linux")]
use std::path::PathBuf;
#[cfg(target_os = "linux")]
use std::process::Command;

/// What the directory sits on.
#[derive(Debug, Clone, PartialEq, Eq)]
// Off Linux only `Unknown` is measured; the report still names the others.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub enum Volume {
    Encrypted(CryptVolume),
    /// Not dm-crypt: the device (`major:minor`, and its name when known).
    Plain(String),
    /// The device could not be read (a filesystem without one, a
    /// container without sysfs, ...): why.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptVolume {
    /// The mapping's name (`/dev/mapper/NAME`).
    pub name: String,
    /// `LUKS1`, `LUKS2` or `PLAIN`, from the mapping's uuid.
    pub format: String,
    /// From the table; None when it cannot be read (not root).
    pub table: Result<CryptTable, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptTable {
    pub cipher: String,
    pub key_bits: u32,
}

impl CryptVolume {
    /// False when the table is read and its cipher is `cipher_null`; an
    /// unread table is taken at its mapping's word.
    pub fn encrypts(&self) -> bool {
        !self
            .table
            .as_ref()
            .is_ok_and(|t| t.cipher.starts_with("cipher_null"))
    }
}

impl std::fmt::Display for CryptVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dm-crypt volume {} ({}", self.name, self.format)?;
        match &self.table {
            Ok(t) => write!(f, ", {} with a {}-bit key)", t.cipher, t.key_bits),
            Err(_) => write!(f, ")"),
        }
    }
}

/// The volume under `dir`, measured through `/sys` and `dmsetup`.
#[cfg(target_os = "linux")]
pub fn under(dir: &Path) -> Volume {
    under_with(dir, Path::new("/sys"), &|name| dmsetup_table(name))
}

/// Not measured: dm-crypt volumes are Linux's.
#[cfg(not(target_os = "linux"))]
pub fn under(dir: &Path) -> Volume {
    Volume::Unknown(format!(
        "the volume under {} is not measured: dm-crypt and sysfs are Linux's",
        dir.display()
    ))
}

#[cfg(target_os = "linux")]
fn under_with(dir: &Path, sys: &Path, table: &dyn Fn(&str) -> Result<String, String>) -> Volume {
    let dev = match std::fs::metadata(dir) {
        Ok(meta) => meta.dev(),
        Err(e) => return Volume::Unknown(format!("cannot stat {}: {e}", dir.display())),
    };
    let id = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let block = sys.join("dev/block").join(&id);
    if !block.exists() {
        return Volume::Unknown(format!(
            "{} is on device {id}, which is not a block device in {}",
            dir.display(),
            sys.display()
        ));
    }
    match crypt_below(&block, 0) {
        Some((name, format)) => {
            let table = table(&name).and_then(|text| parse_table(&text));
            Volume::Encrypted(CryptVolume {
                name,
                format,
                table,
            })
        }
        None => Volume::Plain(device_name(&block).map_or(id.clone(), |n| format!("{n} ({id})"))),
    }
}

#[cfg(target_os = "linux")]
fn device_name(block: &Path) -> Option<String> {
    let uevent = std::fs::read_to_string(block.join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|n| format!("/dev/{n}"))
}

/// Formats cryptsetup names its encrypting mappings by (`CRYPT-FORMAT-…`
/// in `dm/uuid`); INTEGRITY and VERITY mappings encrypt nothing.
#[cfg(target_os = "linux")]
const ENCRYPTING: [&str; 5] = ["LUKS1", "LUKS2", "PLAIN", "TCRYPT", "BITLK"];

/// The dm-crypt mapping that `block` is, or that every device under it
/// leads to (LVM's `slaves`, the disk a partition belongs to): (name,
/// format). A stack with one plain leg (a volume group extended onto a
/// plain disk, a RAID with one unencrypted member) is not encrypted.
#[cfg(target_os = "linux")]
fn crypt_below(block: &Path, depth: u32) -> Option<(String, String)> {
    // Device stacks are a few levels deep; the bound stops a loop.
    if depth > 8 {
        return None;
    }
    let block = std::fs::canonicalize(block).unwrap_or_else(|_| block.to_path_buf());
    if let Ok(uuid) = std::fs::read_to_string(block.join("dm/uuid"))
        && let Some(rest) = uuid.trim().strip_prefix("CRYPT-")
    {
        let format = rest.split('-').next().unwrap_or_default().to_string();
        if !ENCRYPTING.contains(&format.as_str()) {
            return None;
        }
        let name = std::fs::read_to_string(block.join("dm/name"))
            .map(|n| n.trim().to_string())
            .unwrap_or_default();
        return Some((name, format));
    }
    let mut below: Vec<PathBuf> = std::fs::read_dir(block.join("slaves"))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    if block.join("partition").exists()
        && let Some(disk) = block.parent()
    {
        below.push(disk.to_path_buf());
    }
    below.sort();
    let mut found = None;
    for device in &below {
        // Every leg must be encrypted; the first mapping names the volume.
        let leg = crypt_below(device, depth + 1)?;
        found.get_or_insert(leg);
    }
    found
}

#[cfg(target_os = "linux")]
fn dmsetup_table(name: &str) -> Result<String, String> {
    let out = Command::new("dmsetup")
        .args(["table", "--target", "crypt", name])
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "dmsetup is not installed (Debian: apt install dmsetup)".to_string()
            }
            _ => format!("cannot run dmsetup: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "dmsetup table {name}: {} (reading a device-mapper table takes root)",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A crypt target's line: `start length crypt cipher key iv_offset device
/// offset [options]`. The key is hex (masked as zeros without
/// `--showkeys`) or a keyring reference `:BYTES:type:description`.
#[cfg(target_os = "linux")]
fn parse_table(text: &str) -> Result<CryptTable, String> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("crypt"))
        .ok_or_else(|| format!("no crypt target in the table: {:?}", text.trim()))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (cipher, key) = match fields.as_slice() {
        [_, _, _, cipher, key, ..] => (*cipher, *key),
        _ => return Err(format!("a crypt line without cipher and key: {line:?}")),
    };
    let key_bytes = match key.strip_prefix(':') {
        Some(keyring) => keyring
            .split(':')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| format!("an unreadable keyring key reference {key:?}"))?,
        None if key.len() % 2 == 0 && key.bytes().all(|b| b.is_ascii_hexdigit()) => {
            key.len() as u32 / 2
        }
        None => return Err(format!("an unreadable key field in {line:?}")),
    };
    Ok(CryptTable {
        cipher: cipher.to_string(),
        key_bits: key_bytes * 8,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn crypt_tables_give_cipher_and_key_size() {
        let keyring = "0 2093056 crypt aes-xts-plain64 :64:logon:cryptsetup:1b2c-d0 0 7:0 32768 1 allow_discards\n";
        assert_eq!(
            parse_table(keyring).unwrap(),
            CryptTable {
                cipher: "aes-xts-plain64".into(),
                key_bits: 512
            }
        );
        let masked = format!(
            "0 409600 crypt aes-cbc-essiv:sha256 {} 0 8:2 4096\n",
            "0".repeat(64)
        );
        assert_eq!(parse_table(&masked).unwrap().key_bits, 256);
        assert!(parse_table("0 100 linear 8:1 0\n").is_err());
        assert!(parse_table("0 100 crypt aes :x:logon 0 8:1 0").is_err());
    }

    /// A sysfs of this shape: `dev/block/253:1` (LVM) on `253:0`
    /// (dm-crypt, LUKS2) on the partition `8:2` of `sda`.
    fn fake_sysfs(root: &Path, crypt: bool) {
        let devices = root.join("devices/virtual/block");
        let sda2 = root.join("devices/pci/sda/sda2");
        std::fs::create_dir_all(&sda2).unwrap();
        std::fs::write(sda2.join("partition"), "2\n").unwrap();
        std::fs::write(sda2.join("uevent"), "MAJOR=8\nMINOR=2\nDEVNAME=sda2\n").unwrap();
        for (dm, uuid, name) in [
            (
                "dm-0",
                if crypt {
                    "CRYPT-LUKS2-0f1e-vault"
                } else {
                    "LVM-aaa"
                },
                "vault",
            ),
            ("dm-1", "LVM-bbb", "vg-data"),
        ] {
            std::fs::create_dir_all(devices.join(dm).join("dm")).unwrap();
            std::fs::create_dir_all(devices.join(dm).join("slaves")).unwrap();
            std::fs::write(devices.join(dm).join("dm/uuid"), format!("{uuid}\n")).unwrap();
            std::fs::write(devices.join(dm).join("dm/name"), format!("{name}\n")).unwrap();
            std::fs::write(devices.join(dm).join("uevent"), format!("DEVNAME={dm}\n")).unwrap();
        }
        std::os::unix::fs::symlink(devices.join("dm-0"), devices.join("dm-1/slaves/dm-0")).unwrap();
        std::os::unix::fs::symlink(&sda2, devices.join("dm-0/slaves/sda2")).unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(devices.join("dm-1"), root.join("dev/block/ID")).unwrap();
    }

    fn measured(crypt: bool, table: Result<String, String>) -> Volume {
        let sys = tempfile::tempdir().unwrap();
        fake_sysfs(sys.path(), crypt);
        // Name the directory's real device in the fake tree.
        let dir = sys.path();
        let dev = std::fs::metadata(dir).unwrap().dev();
        let id = format!(
            "{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        std::fs::rename(
            sys.path().join("dev/block/ID"),
            sys.path().join("dev/block").join(id),
        )
        .unwrap();
        under_with(dir, sys.path(), &|name| {
            assert_eq!(name, "vault");
            table.clone()
        })
    }

    #[test]
    fn a_crypt_mapping_below_lvm_is_found() {
        let table = Ok("0 1000 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 8:2 32768\n".into());
        let Volume::Encrypted(volume) = measured(true, table) else {
            panic!("not found");
        };
        assert_eq!(
            (volume.name.as_str(), volume.format.as_str()),
            ("vault", "LUKS2")
        );
        assert_eq!(
            volume.to_string(),
            "dm-crypt volume vault (LUKS2, aes-xts-plain64 with a 512-bit key)"
        );
        let Volume::Encrypted(unread) = measured(true, Err("needs root".into())) else {
            panic!("not found");
        };
        assert_eq!(unread.table, Err("needs root".into()));
    }

    #[test]
    fn a_stack_with_a_plain_leg_or_an_integrity_mapping_is_plain() {
        let sys = tempfile::tempdir().unwrap();
        fake_sysfs(sys.path(), true);
        let lvm = sys.path().join("devices/virtual/block/dm-1");
        // The volume group extended onto a plain disk.
        let sdb = sys.path().join("devices/pci/sdb");
        std::fs::create_dir_all(&sdb).unwrap();
        std::os::unix::fs::symlink(&sdb, lvm.join("slaves/sdb")).unwrap();
        assert_eq!(crypt_below(&lvm, 0), None);
        std::fs::remove_file(lvm.join("slaves/sdb")).unwrap();
        assert_eq!(crypt_below(&lvm, 0), Some(("vault".into(), "LUKS2".into())));
        let crypt = sys.path().join("devices/virtual/block/dm-0/dm/uuid");
        std::fs::write(crypt, "CRYPT-INTEGRITY-0f1e-vault\n").unwrap();
        assert_eq!(crypt_below(&lvm, 0), None);
    }

    #[test]
    fn a_stack_without_crypt_is_plain() {
        match measured(false, Err("unused".into())) {
            Volume::Plain(device) => assert!(device.starts_with("/dev/dm-1 ("), "{device}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_real_data_directory_is_measured() {
        // Whatever this machine has: a clear answer, never a panic.
        let dir = tempfile::tempdir().unwrap();
        match under(dir.path()) {
            Volume::Encrypted(v) => assert!(!v.name.is_empty()),
            Volume::Plain(device) => assert!(!device.is_empty()),
            Volume::Unknown(why) => assert!(why.contains(&dir.path().display().to_string())),
        }
    }
}
