"""What the flow-matching families (SD3 / SD3.5, FLUX.1) share: velocity prediction on the scheduler's shifted
rectified flow (:class:`~ctrldiff.noise.FlowMatch`), and the sampler check."""

from __future__ import annotations

from ..errors import CtrlDiffError
from ..noise import FlowMatch
from .diffusers_backend import Family


class FlowFamily(Family):
    flow = True

    def prediction(self) -> str:
        return "v"  # the transformer predicts the flow velocity eps - x0

    def image_seq_len(self, resolution: int) -> int:
        raise NotImplementedError

    def process(self, resolution: int) -> FlowMatch:
        name = type(self.pipe.scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise CtrlDiffError(f"flow pipelines need a FlowMatchEulerDiscreteScheduler, this one has {name}")
        return FlowMatch.from_scheduler_config(self.pipe.scheduler.config, self.image_seq_len(resolution))

    def check_sampler(self, sampler) -> None:
        if sampler.solver == "em":
            raise CtrlDiffError("sampler.solver 'em' is unstable on a flow-matching pipeline (its first step from "
                                "t_max = 0.995 scales the state by 1 - dtau / (1 - t) << -1); use ddim (eta = 1: the "
                                "exact Gaussian step, eta = 0: the pipeline's own Euler sampler) or ode-euler")
