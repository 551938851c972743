"""The report's schema version: which rules judged a report (light: listings read it without torch)."""

REPORT_SCHEMA_VERSION = 6  # 2: matched n, two references, verdicts, half-sampling intervals; 3: TSTR judged
# against real training images at the synthetic set's size and class mix (was: the whole real split);
# 4: intra-class SSIM judged both ways, a pass's reason says which kind (was: "within noise" for any pass);
# 5: the verdict says when its set metrics rest on fewer than reliable_n images (verdict.small_n);
# 6: overall baselines and references drawn with the cohort's class mix (was: the real split's own)


def outdated(report: dict) -> str | None:
    """Why a report's verdict is not this meddiff's (judged by an older schema's rules), or None."""
    schema = report.get("report_schema_version")
    if schema == REPORT_SCHEMA_VERSION:
        return None
    return f"judged by report schema {schema}, this meddiff judges by {REPORT_SCHEMA_VERSION}"
