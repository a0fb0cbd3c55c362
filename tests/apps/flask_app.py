"""A real Flask app served by prefork in the tests."""
from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@app.route("/")
def index():
    return "flask index"


@app.route("/items/<int:item_id>", methods=["GET", "DELETE"])
def item(item_id):
    return jsonify(id=item_id, method=request.method)


@app.route("/form", methods=["POST"])
def form():
    return jsonify(name=request.form["name"], tags=request.form.getlist("tag"))


@app.route("/upload", methods=["POST"])
def upload():
    file = request.files["file"]
    data = file.read()
    return jsonify(filename=file.filename, size=len(data), head=data[:8].decode("latin-1"))


@app.route("/stream")
def stream():
    def generate():
        for i in range(3):
            yield f"part {i}\n"
    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.route("/chunks", methods=["POST"])
def chunks():
    sizes = []
    while True:
        block = request.stream.read(1000)
        if not block:
            break
        sizes.append(len(block))
    return jsonify(total=sum(sizes), reads=len(sizes))


@app.route("/fail")
def fail():
    raise ValueError("flask view failed")


@app.errorhandler(404)
def not_found(error):
    return jsonify(error="custom not found"), 404


@app.errorhandler(500)
def server_error(error):
    return "custom server error page", 500
