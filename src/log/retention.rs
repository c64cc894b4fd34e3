//! Retention: which sealed segments age or size limits drop, and deleting
//! them (whole segments only; the active one is never deleted).

use std::sync::Arc;

use super::error::Result;
use super::segment::{self, Segment};
use super::{Inner, RetentionReport};
use crate::sync::write;

impl Inner {
    pub(super) fn apply_retention(&self, now_ms: u64) -> Result<RetentionReport> {
        let retention = self.options.retention;
        let doomed: Vec<Arc<Segment>> = {
            let segments = self.segments();
            let sealed = &segments[..segments.len().saturating_sub(1)];
            let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
            let mut doomed = Vec::new();
            for segment in sealed {
                let over_size = retention.bytes_max.is_some_and(|max| total > max);
                let over_age = retention.age_ms_max.is_some_and(|max| {
                    segment
                        .last_timestamp_ms()
                        .is_some_and(|ts| now_ms.saturating_sub(ts) > max)
                });
                if !(over_size || over_age) {
                    break;
                }
                total -= segment.size_bytes();
                doomed.push(Arc::clone(segment));
            }
            doomed
        };
        self.delete_segments(doomed)
    }

    /// Removes `doomed` (a prefix of the sealed segments) from the log and
    /// deletes their files.
    pub(super) fn delete_segments(&self, doomed: Vec<Arc<Segment>>) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        if !doomed.is_empty() {
            // Not while its seal may still be writing index files.
            self.finish_seal();
            let mut segments = write(&self.segments);
            segments.retain(|s| !doomed.iter().any(|d| Arc::ptr_eq(s, d)));
        }
        for segment in &doomed {
            segment.delete_files(&self.dir)?;
            report.segments_deleted += 1;
            report.bytes_deleted += segment.size_bytes();
            tracing::info!(segment = %segment.path.display(), bytes = segment.size_bytes(), "deleted a segment");
        }
        if !doomed.is_empty() {
            segment::sync_dir(&self.options.disk, &self.dir)?;
        }
        report.start_offset = self.segments().first().map_or(0, |s| s.base_offset);
        Ok(report)
    }
}
