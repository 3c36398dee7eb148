"""The project's emulator in a process of its own, for the ratio benchmarks: the provider
then does not share a CPU core or an event loop with the code being measured (a real
provider is remote, too).

    python -m bench.emulator_proc --api-key KEY [--batch-delay-s 0.5]

Prints the base URL on stdout once it listens; stops when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


async def serve(api_key: str, batch_delay_s: float) -> None:
    from service.emulator import Emulator, EmulatorConfig

    emulator = Emulator(EmulatorConfig(api_key=api_key, batch_delay_s=batch_delay_s, seed=1))
    url = await emulator.start(host="127.0.0.1", port=0)
    print(url, flush=True)
    try:
        # The parent holds our stdin: when it goes away (or closes it), so do we.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--batch-delay-s", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(serve(args.api_key, args.batch_delay_s))


if __name__ == "__main__":
    main()
