"""Reporting and workforce management: KPIs from the queue event log, a live wallboard
snapshot, Erlang C / Erlang A staffing, forecasting of offered calls and SVG charts.

Everything here is pure library code: it reads events and numbers and returns numbers; it
opens no socket and reads no clock.
"""
