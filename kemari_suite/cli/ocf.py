"""``ocf:kemari:vm``'s entry point: Pacemaker runs ``/usr/lib/ocf/resource.d/kemari/vm
ACTION`` (a two-line sh wrapper installed by the playbooks) with the parameters in
``OCF_RESKEY_*``; this prints meta-data, logs to stderr (Pacemaker keeps an agent's
stderr in its log) and exits with the OCF code. The logic is
:mod:`kemari_suite.ha.ocf`.
"""

from __future__ import annotations

import logging
import os
import sys

from kemari_suite.ha.ocf import OcfRc, run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    action = args[0] if args else ""
    instance = os.environ.get("OCF_RESOURCE_INSTANCE", "kemari-vm")
    # resource-agents spells it this way (ocf-tester -d exports it).
    debug = os.environ.get("HA_debug", "0") not in ("", "0")  # noqa: SIM112
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format=f"kemari-vm({instance})[%(process)d]: %(levelname)s: %(message)s",
    )
    if not action:
        sys.stderr.write(
            "usage: vm {start|stop|monitor|promote|demote|notify|meta-data|validate-all}\n"
        )
        return int(OcfRc.ERR_UNIMPLEMENTED)
    out = run(action)
    if out.stdout:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
    return int(out.rc)


if __name__ == "__main__":
    sys.exit(main())
