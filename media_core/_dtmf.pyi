import numpy as np
import numpy.typing as npt

class Detector:
    def configure(
        self,
        *,
        min_level_dbm0: float | None = ...,
        max_fwd_twist_db: float | None = ...,
        max_rev_twist_db: float | None = ...,
        max_deviation: float | None = ...,
        on_windows: int | None = ...,
        off_windows: int | None = ...,
        max_gap_windows: int | None = ...,
        min_tone_ratio: float | None = ...,
        min_group_ratio_db: float | None = ...,
    ) -> None: ...
    def feed(self, samples: npt.NDArray[np.int16]) -> bytes: ...
    def trace(self, samples: npt.NDArray[np.int16]) -> list[tuple[int, str]]: ...
    def reset(self) -> None: ...
    @property
    def current(self) -> str: ...
    @property
    def samples(self) -> int: ...
    @property
    def overflow(self) -> int: ...
