"""Human-readable run reports: `report.md` with PNG plots beside it."""

from moeprune.report.markdown import human_bytes, render_report_md, write_report_md
from moeprune.report.plots import plot_kept_map, plot_saliency, plot_usage_heatmap

__all__ = ["human_bytes", "plot_kept_map", "plot_saliency", "plot_usage_heatmap", "render_report_md",
           "write_report_md"]
