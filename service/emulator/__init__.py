"""An OpenAI-compatible emulator: chat completions, embeddings, Files and Batch APIs.

Used by the project's tests and as the offline default provider. Answers are
deterministic and schema-valid; faults (429/5xx/timeouts, RPM/TPM limits, failed or
expired batches, per-line errors) can be injected. See ``README.md`` in this package.

    from service.emulator import Emulator, EmulatorConfig, FaultConfig
    emu = Emulator(EmulatorConfig(batch_delay_s=0.5))
    base_url = await emu.start()      # "http://127.0.0.1:<port>/v1"
    ...
    await emu.stop()
"""

from .config import BatchFault, EmulatorConfig, FaultConfig
from .errors import EmulatedError
from .server import Emulator, run_forever

__all__ = ["BatchFault", "EmulatedError", "Emulator", "EmulatorConfig", "FaultConfig", "run_forever"]
