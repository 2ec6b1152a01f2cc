"""edgefleet's packager: model versions as signed, multi-platform OCI packages.

A package is an OCI image index with one image per platform; each image is,
bottom-up, in runnable images only the base image's layers, the Python
packages for that platform (deps) and edgefleet's serving code, then the
model files (one plain-tar layer, byte-identical on every platform) and
serving.json. It is signed cosign-style under the tag
`sha256-<hex>.sig`.

Modules, each with one job (the format itself, signatures, verification and the
runtime table are the shared contract's, in contract/):

- `tarball`, `layers`, `archive`: reproducible tars, the package's layers, and
  layouts written as OCI archives;
- `deps`: the runtime's wheels per platform;
- `prepare`: conversion (ONNX/TFLite -> OpenVINO IR) and fp16/int8
  optimisation before a build, with an accuracy check against the original
  (run by a runner its caller passes in: the packager never imports the agent);
- `build`: `build_package`, writing a package to an OCI layout;
- `image`, `base`: what makes an image runnable (the edgefleet layer), and
  a Debian base image made with mmdebstrap;
- `modelfile`: what a model's files are (framework, entrypoint, signature),
  read with onnx and flatbuffers;
- `distribution`: a client for OCI registries (push, resumable pull), the one
  packager module the agent imports.

Copying a package elsewhere must keep its digests, or the signature no longer
applies: `skopeo copy --all --preserve-digests` does; plain `skopeo copy`
gzips the plain-tar model layer and so makes a different, unsigned package.
"""
