# Drip's image: Python, PyTorch (its wheels bring their own CUDA libraries, so the host needs
# only an NVIDIA driver and the NVIDIA Container Toolkit) and Drip itself.
#
# The starters build it through the Docker SDK and tag it drip:<hash of the build context and
# base image>, so an unchanged project is never rebuilt. By hand:
#   docker build -t drip .
#   docker build -t drip --network host --build-arg BASE_IMAGE=drip-test-base:bookworm .
# BASE_IMAGE needs python3 >= 3.10 with venv support (the test base is Debian bookworm's 3.11;
# the default is the official image of the same Python, so both install the same wheels).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# A venv: Debian's own python3 refuses system-wide pip installs (PEP 668), and a venv behaves
# the same on the official Python images.
ENV VIRTUAL_ENV=/opt/drip \
    PATH=/opt/drip/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/drip

# The requirements get their own layer, before the code: PyTorch and its CUDA libraries are
# gigabytes, and a change to Drip's code must not download them again.
COPY requirements.txt requirements-nodeps.txt /opt/drip-src/
RUN pip install --no-cache-dir -r /opt/drip-src/requirements.txt \
    && pip install --no-cache-dir --no-deps -r /opt/drip-src/requirements-nodeps.txt

# The package (the context holds only what .dockerignore lets in).
COPY . /opt/drip-src/
RUN pip install --no-cache-dir --no-deps /opt/drip-src \
    && rm -rf /opt/drip-src \
    && drip --version

# A non-root default user. The starters run the container as the invoking user's UID:GID
# instead (files Drip writes then belong to that user), with HOME and USER set for them.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash drip
USER drip
WORKDIR /home/drip
CMD ["drip", "--help"]
