//! A tmpfs mounted for one test (root only), unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs with `options` (`size=64m`, ...) at `at`. Without root it
/// prints why `test` is skipped and returns `None`, unless
/// `BIDA_REQUIRE_MOUNT=1` (CI as root), where it fails.
pub fn mount_tmpfs(at: &Path, options: &str, test: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("BIDA_REQUIRE_MOUNT").as_deref() != Ok("1"),
            "BIDA_REQUIRE_MOUNT=1 but mounting a tmpfs failed (needs root)"
        );
        eprintln!("SKIPPED: {test} needs to mount a tmpfs (root)");
        return None;
    }
    Some(Mount(at.to_path_buf()))
}
