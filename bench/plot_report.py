"""Draws the benchmark report's bar charts.

Usage: /usr/bin/python3 bench/plot_report.py PLOTS_JSON OUTPUT_DIRECTORY

PLOTS_JSON is the `plots.json` that `cargo bench --bench report` writes: a list of charts, each
with a file name, title, y label, log scale flag, category labels and one series of values per
target (null where a step failed). Every chart becomes a grouped bar chart, one group per
category and one bar per target; the path of each PNG written is printed on its own line.
Needs Debian's python3-matplotlib (run with /usr/bin/python3: a pyenv python3 may shadow it).
"""

import json
import os
import sys

import matplotlib

# No display here: render straight to files.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)


def draw(chart, output_directory):
    categories = chart["categories"]
    series = chart["series"]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(categories) + 2.5), 4.8))
    group_width = 0.8
    bar_width = group_width / max(1, len(series))
    for index, one in enumerate(series):
        # A failed value has no bar; its place in the group stays empty.
        positions = [
            category + (index - (len(series) - 1) / 2) * bar_width
            for category, value in enumerate(one["values"])
            if value is not None
        ]
        heights = [value for value in one["values"] if value is not None]
        axes.bar(positions, heights, width=bar_width, label=one["label"])
    axes.set_xticks(range(len(categories)))
    axes.set_xticklabels(categories, rotation=20, ha="right")
    axes.set_ylabel(chart["ylabel"])
    axes.set_title(chart["title"])
    if chart["log_scale"]:
        axes.set_yscale("log")
    axes.grid(axis="y", alpha=0.3)
    # Outside the axes, so no bar is hidden behind it.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path = os.path.join(output_directory, chart["file"])
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as source:
        plots = json.load(source)
    for chart in plots["charts"]:
        print(draw(chart, sys.argv[2]))


if __name__ == "__main__":
    main()
