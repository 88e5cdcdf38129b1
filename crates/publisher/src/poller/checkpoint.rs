//! Where the poller is in each shard, kept across restarts (`chorus-publisher poll
//! --checkpoint-file`): per shard, the last sequence number handled, or that the shard is closed
//! and fully read.
//!
//! [`FileCheckpoint`] keeps it in a small JSON file, replaced atomically (written beside it, synced,
//! renamed over it), so a crash leaves the previous checkpoint or the new one, never a torn one.
//! A missing file is a first start; a file that cannot be read as a checkpoint is an error for the
//! operator to resolve, never silently ignored (that would re-publish the whole stream, or skip it).
//! One poller owns one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The positions of one stream's shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The stream the positions belong to (shard ids are only unique within a stream).
    pub stream_arn: String,
    pub shards: BTreeMap<String, ShardCheckpoint>,
}

/// Where the poller is in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardCheckpoint {
    /// Every record up to and including this sequence number is handled.
    After(String),
    /// The shard is closed and every record in it is handled.
    Finished,
}

/// A checkpoint that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "checkpoint file {} is not a poller checkpoint: repair or delete it \
         (without it the poller starts from each shard's trim horizon)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: Unreadable,
    },
    #[error("checkpoint file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a checkpoint file is not a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("not a checkpoint's JSON")]
    Json(#[from] serde_json::Error),
    #[error("version {found}, this poller reads version {FILE_VERSION}")]
    Version { found: u32 },
}

/// Keeps the poller's [`Checkpoint`].
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The saved checkpoint; `None` when there is none yet.
    ///
    /// # Errors
    /// When one exists but cannot be read.
    async fn load(&self) -> Result<Option<Checkpoint>, CheckpointError>;

    /// Replaces the saved checkpoint.
    ///
    /// # Errors
    /// When it cannot be written; the previous one is then still there.
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError>;
}

/// The file format, versioned so a later change is detected rather than misread.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    version: u32,
    stream_arn: String,
    shards: BTreeMap<String, ShardCheckpoint>,
}

const FILE_VERSION: u32 = 1;

/// [`CheckpointStore`] in a JSON file.
#[derive(Debug, Clone)]
pub struct FileCheckpoint {
    path: PathBuf,
}

impl FileCheckpoint {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCheckpoint { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[async_trait::async_trait]
impl CheckpointStore for FileCheckpoint {
    async fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let corrupt = |source: Unreadable| CheckpointError::Corrupt {
            path: self.path.clone(),
            source,
        };
        let file: CheckpointFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(Unreadable::Json(e)))?;
        if file.version != FILE_VERSION {
            return Err(corrupt(Unreadable::Version {
                found: file.version,
            }));
        }
        Ok(Some(Checkpoint {
            stream_arn: file.stream_arn,
            shards: file.shards,
        }))
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let file = CheckpointFile {
            version: FILE_VERSION,
            stream_arn: checkpoint.stream_arn.clone(),
            shards: checkpoint.shards.clone(),
        };
        let mut bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| self.io(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        let path = self.path.clone();
        // Blocking file calls off the runtime's threads. Run to completion even if this future is
        // dropped: the rename is what makes the new checkpoint visible, all or nothing.
        tokio::task::spawn_blocking(move || replace_file(&path, &bytes))
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
            .map_err(|e| self.io(e))
    }
}

/// Writes `bytes` to `path` atomically: a synced temporary file beside it, renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;

    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable (best effort: not every platform can sync a directory).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test.
    fn scratch_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("chorus-checkpoint-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sample() -> Checkpoint {
        Checkpoint {
            stream_arn: "arn:aws:dynamodb:us-east-1:1:table/t/stream/label".into(),
            shards: BTreeMap::from([
                ("shard-a".into(), ShardCheckpoint::After("1200".into())),
                ("shard-b".into(), ShardCheckpoint::Finished),
            ]),
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_a_first_start() {
        let store = FileCheckpoint::new(scratch_dir("missing").join("poller.json"));
        assert_eq!(store.load().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_saved_checkpoint_loads_back_and_leaves_no_temporary_file() {
        let dir = scratch_dir("round-trip");
        let store = FileCheckpoint::new(dir.join("poller.json"));
        store.save(&sample()).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(sample()));

        let mut later = sample();
        later
            .shards
            .insert("shard-a".into(), ShardCheckpoint::After("1300".into()));
        store.save(&later).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(later));
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["poller.json"]);
    }

    #[tokio::test]
    async fn the_file_is_readable_json_an_operator_can_inspect() {
        let dir = scratch_dir("format");
        let store = FileCheckpoint::new(dir.join("poller.json"));
        store.save(&sample()).await.unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "stream_arn": "arn:aws:dynamodb:us-east-1:1:table/t/stream/label",
                "shards": {"shard-a": {"after": "1200"}, "shard-b": "finished"},
            })
        );
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_naming_the_file() {
        let dir = scratch_dir("corrupt");
        let path = dir.join("poller.json");
        for content in [
            "",
            "{\"version\":1,\"stream_arn\":\"a\",\"shards\":{\"s\":{\"af",
            "[1, 2]",
            "{\"version\":2,\"stream_arn\":\"a\",\"shards\":{}}",
            "{\"version\":1,\"stream_arn\":\"a\",\"shards\":{\"s\":{\"before\":\"1\"}}}",
        ] {
            std::fs::write(&path, content).unwrap();
            let err = FileCheckpoint::new(&path).load().await.unwrap_err();
            assert!(
                matches!(err, CheckpointError::Corrupt { .. }),
                "{content:?}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()) && message.contains("delete it"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn an_unwritable_place_is_an_error_and_keeps_the_previous_checkpoint() {
        let dir = scratch_dir("unwritable");
        let store = FileCheckpoint::new(dir.join("poller.json"));
        store.save(&sample()).await.unwrap();
        // A directory where the temporary file would go makes the write fail.
        std::fs::create_dir(dir.join("poller.json.tmp")).unwrap();
        let err = store.save(&Checkpoint::default()).await.unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err:?}");
        assert_eq!(store.load().await.unwrap(), Some(sample()));
    }
}
