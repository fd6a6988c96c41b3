from django.urls import path

from . import actions, add_model, dashboard, estimate, pages, playground, reservations

urlpatterns = [
    path("", dashboard.dashboard, name="dashboard"),
    path("load/", actions.load, name="load"),
    path("load/estimate/", estimate.load_estimate, name="load-estimate"),
    path("instances/<int:pk>/unload/", actions.unload, name="instance-unload"),
    path("instances/<int:pk>/switch/", actions.switch, name="instance-switch"),
    path("instances/<int:pk>/log/", pages.instance_log, name="instance-log"),
    path("instances/<int:pk>/playground/", playground.playground, name="playground"),
    path("gpus/<int:gpu_pk>/orphans/<int:pid>/kill/", actions.kill_orphan, name="orphan-kill"),
    path("events/", pages.events, name="events"),
    path("reservations/", reservations.reservations, name="reservations"),
    path("models/add/", add_model.model_files, name="model-files"),
    path("favicon.ico", pages.favicon, name="favicon"),
]
