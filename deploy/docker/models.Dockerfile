# syntax=docker/dockerfile:1.7
# The bundled model repository (deploy/models/car-anomaly: versions 1 and 2 with their
# evaluation; not the training script) at /models, for delivering models to a model server
# that runs from its own image:
#
#   docker build -f deploy/docker/models.Dockerfile -t vigil/models:dev .
#
# - Kubernetes: an init container copies it into a shared emptyDir,
#     command: ["cp", "-R", "/models/.", "/target/"]
#   then the model server reads /target/car-anomaly (or mount the image itself as an image
#   volume where the cluster supports those).
# - docker compose: deploy/compose/docker-compose.yml bind-mounts deploy/models instead.
#
# busybox (not scratch) so the image has `cp` for that init container; it runs nothing else.
FROM busybox:1.37.0
LABEL org.opencontainers.image.title="vigil models" \
      org.opencontainers.image.description="Vigil's bundled car-anomaly SavedModel repository at /models" \
      org.opencontainers.image.licenses="Apache-2.0"
# Owned by root and read-only to everyone else: the model server only reads it.
COPY deploy/models/car-anomaly /models/car-anomaly
USER 65532:65532
WORKDIR /models
CMD ["ls", "-lR", "/models"]
