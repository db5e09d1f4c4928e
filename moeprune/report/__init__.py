"""Human-readable run reports: report.md and PNG plots."""

from moeprune.report.markdown import human_bytes, write_report_md
from moeprune.report.plots import plot_kept_map, plot_saliency, plot_usage_heatmap

__all__ = ["human_bytes", "plot_kept_map", "plot_saliency", "plot_usage_heatmap", "write_report_md"]
