from django.urls import path

from . import web

urlpatterns = [path("", web.usage_page, name="usage")]
