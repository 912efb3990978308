"""The Open-Sora studio: a Gradio app over one or more engines. It never imports torch (app.py builds the engines)."""

from studio.jobs import EnginePool, SessionJob
from studio.layout import STUDIO_CSS, build_demo, studio_theme
from studio.settings import StudioSettings, deployment_is_public

__all__ = ["EnginePool", "SessionJob", "STUDIO_CSS", "StudioSettings", "build_demo", "deployment_is_public",
           "studio_theme"]
