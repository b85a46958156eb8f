"""IVR: flows loaded from YAML and validated at load time, and a sans-IO runner that walks one
call through a flow (see docs/ivr.md)."""

from appliance.ivr.flow import Flow, FlowError, FlowProblem, Node, load_flows
from appliance.ivr.runner import (
    CallerHungUp,
    DigitPressed,
    FlowRun,
    Hangup,
    HttpLookup,
    HttpResult,
    OfferCallback,
    Play,
    PromptFinished,
    RouteToQueue,
    StartCollect,
    StartTimer,
    StopPlayback,
    TimerFired,
    Transfer,
    Voicemail,
)
from appliance.ivr.validate import validate_flows

__all__ = [
    "CallerHungUp",
    "DigitPressed",
    "Flow",
    "FlowError",
    "FlowProblem",
    "FlowRun",
    "Hangup",
    "HttpLookup",
    "HttpResult",
    "Node",
    "OfferCallback",
    "Play",
    "PromptFinished",
    "RouteToQueue",
    "StartCollect",
    "StartTimer",
    "StopPlayback",
    "TimerFired",
    "Transfer",
    "Voicemail",
    "load_flows",
    "validate_flows",
]
