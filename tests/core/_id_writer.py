"""Helper process for tests/test_ids.py: prints its pid, then ``count`` fresh message ids.

Usage: ``python _id_writer.py COUNT``. Output: the first line is ``pid <pid>``, then one
id per line from :func:`busd.ids.new_message_id` (the process-wide generator).
"""

from __future__ import annotations

import os
import sys

from busd.core.ids import new_message_id


def main() -> None:
    """Write the pid line and the ids to stdout in one write."""
    count = int(sys.argv[1])
    lines = [f"pid {os.getpid()}"]
    lines.extend(new_message_id() for _ in range(count))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
