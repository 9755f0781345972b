"""report.md and the bar charts from a hand-made table."""

import matplotlib.image
from test_normalise import OWNERS, SCORES, TASKS

from mergekit_ace.evaluation.normalise import build_tables
from mergekit_ace.evaluation.report import write_report


def test_report_tables_and_charts(tmp_path):
    tables = build_tables(SCORES, TASKS, OWNERS, base="base")
    files = write_report(tmp_path, tables, {"backend": "hf", "limit": 5})
    text = (tmp_path / "report.md").read_text()
    # raw primary metric x100 with the raw average, then normalised with its average
    assert "| ace | merge | 45.00 | 30.00 | 37.50 |" in text
    assert "| ace | merge | 90.00 | 75.00 | 82.50 |" in text
    assert "| base | base | 40.00 | 25.00 | 32.50 |" in text
    assert "xquad_zh<br>(owner: zh)" in text and "limit 5 per task" in text
    # base first, then experts, then merges
    assert text.index("| base | base |") < text.index("| zh | expert |") < text.index("| ace | merge |")
    for name in ("scores_raw", "scores_normalised"):
        png = tmp_path / f"{name}.png"
        assert files[name] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # bars were drawn, not a blank canvas
        assert f"]({name}.png)" in text


def test_report_without_owners_has_no_normalised_section(tmp_path):
    write_report(tmp_path, build_tables(SCORES, TASKS))
    text = (tmp_path / "report.md").read_text()
    assert "## Raw scores" in text and "Normalised" not in text
    assert not (tmp_path / "scores_normalised.png").exists()
