"""Thin route modules; each exports `router`. ROUTERS is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

ROUTERS: list[APIRouter] = []
