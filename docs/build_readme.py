"""Stitch README.md from docs/README.head.md and the per-area sections in docs/sections/.

    python docs/build_readme.py

Each area keeps its own section file next to its code's owners; the README is generated so that
benchmark tables are edited in one place.
"""

from pathlib import Path

DOCS = Path(__file__).resolve().parent
ORDER = ["optim", "training", "allocators", "ttc", "zo", "kernels"]


def main() -> None:
    parts = [(DOCS / "README.head.md").read_text().rstrip()]
    for name in ORDER:
        text = (DOCS / "sections" / f"{name}.md").read_text().rstrip()
        # Section files link relative to docs/sections/ ("../x.png" is docs/x.png); the README sits at the top.
        text = text.replace("](../", "](docs/")
        parts.append(text)
    (DOCS.parent / "README.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args()  # --help, and no stray args
    main()
