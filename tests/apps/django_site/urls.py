from django.contrib import admin
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from tests.apps.threaded import meet


def form(request):
    if request.method == "POST":
        return HttpResponse(f"thanks, {request.POST.get('name', '?')}")
    return HttpResponse(f'<form method="post"><input name="csrfmiddlewaretoken" '
                        f'value="{get_token(request)}"><input name="name"></form>')


@csrf_exempt
def upload(request):
    return JsonResponse({"received": len(request.body), "remote": request.META["REMOTE_ADDR"],
                         "length": request.META.get("CONTENT_LENGTH")})


def queries(request, parties):
    """A query, a wait until `parties` requests are in here at once, a query:
    concurrent views, each on its own thread's database connection (plain SQL:
    no table, so no migration is needed)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        first = cursor.fetchone()[0]
        passed = meet(parties)
        cursor.execute("SELECT 2")
        second = cursor.fetchone()[0]
    return JsonResponse({"answers": [first, second], "passed": passed,
                         "connection": id(connection.connection)})


urlpatterns = [path("admin/", admin.site.urls), path("form/", form), path("upload/", upload),
               path("queries/<int:parties>/", queries)]
