"""edgefleet's packager: model versions as signed, multi-platform OCI packages.

A package is an OCI image index with one image per platform; each image is,
bottom-up, in runnable images only the base image's layers, the Python
packages for that platform (deps) and edgefleet's serving code, then the
model files (one plain-tar layer, byte-identical on every platform) and
serving.json. It is signed cosign-style under the tag
`sha256-<hex>.sig`.

Modules, each with one job:

- `oci`: the OCI format (media types, descriptors, canonical JSON, layouts,
  archives, blob digest checks) and the `BlobSource` protocol;
- `tarball`, `layers`: reproducible tars and the package's layers;
- `runtimes`, `deps`, `serving`: which runtime, its wheels per platform,
  and what serving.json says;
- `prepare`: conversion (ONNX/TFLite -> OpenVINO IR) and fp16/int8
  optimisation before a build, with an accuracy check against the original;
- `build`: `build_package`, writing a package to an OCI layout;
- `image`, `base`: what makes an image runnable (the edgefleet layer), and
  a Debian base image made with mmdebstrap;
- `signing`, `cosign`, `verify`: keys, package signatures, and the checks an
  agent runs before using a package;
- `modelfile`: what a model's files are (framework, entrypoint, signature);
- `distribution`: a client for OCI registries (push, resumable pull).

The agent imports `oci`, `tarball`, `layers`, `runtimes`, `serving`,
`signing`, `cosign` and `verify`: stdlib and `cryptography` only.

Copying a package elsewhere must keep its digests, or the signature no longer
applies: `skopeo copy --all --preserve-digests` does; plain `skopeo copy`
gzips the plain-tar model layer and so makes a different, unsigned package.
"""
