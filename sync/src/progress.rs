//! A download progress bar on standard error, drawn only when asked to (on a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of one run's downloads, in bytes; a no-op when hidden.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Draws a bar labelled `label` on standard error when `visible`, nothing otherwise.
    pub fn new(visible: bool, label: &str) -> Self {
        let target = match visible {
            true => ProgressDrawTarget::stderr(),
            false => ProgressDrawTarget::hidden(),
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_string());
        Self { bar }
    }

    /// Sets the total, in bytes.
    pub fn set_length(&self, bytes: u64) {
        self.bar.set_length(bytes);
    }

    /// Adds `bytes` to the progress.
    pub fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
