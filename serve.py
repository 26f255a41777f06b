"""Classify images with an exported subnet:

  python serve.py --subnet <workdir>/search/<name>/subnets/<label> [--top_k 3] FILES_OR_DIRS...
  python serve.py --subnet <export dir> --http 8080 [--host 127.0.0.1]

The first prints a line per image file (a directory: its files), "path: class (probability),
...", or "path: error: <why>" for a file that is not a usable image; the other files are still
classified, and the exit status is 1 if any failed. The second serves POST /classify (an image
as the body) and GET /health on a local port until interrupted. An export that cannot be
served (missing, corrupt, no summary.json) prints one line "error: ..." on stderr and exits
with status 2, as train.py and search.py do. See docs/serving.md.
"""

import sys

from absl import app, flags, logging

from ofajax import errors, serve

_SUBNET = flags.DEFINE_string("subnet", None, "an exported subnet: its directory (model.stablehlo "
                              "+ summary.json, as search.py writes them) or its model.stablehlo")
_TOP_K = flags.DEFINE_integer("top_k", 3, "classes printed per image, most probable first")
_HTTP = flags.DEFINE_integer("http", None, "serve over HTTP on this port instead of classifying "
                             "files (0: any free port)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address --http binds to (0.0.0.0: every "
                            "interface; the endpoint has no authentication)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", serve.BATCH_SIZE, "images per model call")
flags.mark_flag_as_required("subnet")


def classify_files(classifier: serve.Classifier, paths: list[str]) -> int:
  """Prints a line per file; 1 if any failed, else 0."""
  files = serve.expand(paths)
  if not files:
    raise app.UsageError(f"no files to classify in {paths}")
  failed = 0
  for result in classifier.classify_files(files, _TOP_K.value):
    print(result.text(), flush=True)
    failed += not result.ok
  if failed:
    print(f"{failed} of {len(files)} files could not be classified", file=sys.stderr)
  return 1 if failed else 0


def serve_http(classifier: serve.Classifier) -> int:
  server = serve.make_server(classifier, _HOST.value, _HTTP.value, _TOP_K.value)
  classifier.warm_up()
  host, port = server.server_address[:2]
  print(f"serving {classifier.artifact} on http://{host}:{port}: POST an image to /classify, "
        "GET /health; Ctrl-C stops", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def main(argv):
  paths = argv[1:]
  if (_HTTP.value is None) == (not paths):
    raise app.UsageError("give image files or directories to classify, or --http PORT (not "
                         "both)")
  logging.set_verbosity(logging.WARNING)
  classifier = serve.load(_SUBNET.value, _BATCH_SIZE.value)
  classifier.check_top_k(_TOP_K.value)
  return serve_http(classifier) if _HTTP.value is not None else classify_files(classifier, paths)


if __name__ == "__main__":
  errors.run(main)
