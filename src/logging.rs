//! Log setup: `RUST_LOG` filter (default `info`); text or JSON lines on stderr, or journald's
//! native protocol when running under systemd.
//!
//! Under systemd, stderr is a stream to journald and `$JOURNAL_STREAM` names it
//! (`<device>:<inode>`). When it names our stderr, events go to journald directly instead, so
//! that each field (`PROFILE`, `KEY_ID`, `PROVIDER`, ...) is a journal field an operator can
//! filter on: `journalctl -u keybroker KEY_ID=CW...`, and the level is the entry's priority.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Log output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// journald's native protocol, one entry per event with its fields.
    Journald,
}

/// The format to use when none was asked for: journald when `journal_stream` (the value of
/// `$JOURNAL_STREAM`) names the stream `stderr` is, else text.
pub fn default_format(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> LogFormat {
    let named = journal_stream.and_then(|v| {
        let (dev, ino) = v.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    match (named, stderr) {
        (Some(named), Some(ours)) if named == ours => LogFormat::Journald,
        _ => LogFormat::Text,
    }
}

/// `(device, inode)` of stderr.
fn stderr_identity() -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Installs the global subscriber: `format`, or journald under systemd and text otherwise.
/// Call once, before anything logs.
pub fn init(format: Option<LogFormat>) {
    let format = format.unwrap_or_else(|| {
        default_format(
            std::env::var("JOURNAL_STREAM").ok().as_deref(),
            stderr_identity(),
        )
    });
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only on a terminal: journald and log files get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    };
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter())
            .with(lines())
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter())
            .with(lines().json())
            .init(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(journald) => tracing_subscriber::registry()
                .with(filter())
                .with(
                    journald
                        .with_syslog_identifier("keybroker".into())
                        .with_field_prefix(None)
                        // syslog's meaning of the levels: `journalctl -p info` shows info and
                        // up, `-p warning` only what needs a look.
                        .with_priority_mappings(tracing_journald::PriorityMappings {
                            error: tracing_journald::Priority::Error,
                            warn: tracing_journald::Priority::Warning,
                            info: tracing_journald::Priority::Informational,
                            debug: tracing_journald::Priority::Debug,
                            trace: tracing_journald::Priority::Debug,
                        }),
                )
                .init(),
            Err(e) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(lines())
                    .init();
                tracing::warn!(error = %e, "journald is not reachable at /run/systemd/journal/socket; logging to stderr");
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_only_when_journal_stream_names_our_stderr() {
        assert_eq!(
            default_format(Some("8:12345"), Some((8, 12345))),
            LogFormat::Journald
        );
        // Inherited from a parent whose stderr went to the journal; ours goes elsewhere.
        assert_eq!(
            default_format(Some("8:12345"), Some((8, 999))),
            LogFormat::Text
        );
        assert_eq!(default_format(None, Some((8, 12345))), LogFormat::Text);
        assert_eq!(
            default_format(Some("garbage"), Some((8, 12345))),
            LogFormat::Text
        );
    }
}
