"""Local Kubernetes test bed for finetune-operator (standard library only; --trainer-metrics
also needs the project's Python environment).

    hack/cluster up      build or reuse the binaries, start the whole test bed, wait until healthy
    hack/cluster up --api-only
                         only etcd + kube-apiserver with the PyTorchJob CRD (seconds); a later
                         `up` adds the rest in place
    hack/cluster up --trainer-metrics
                         also serve the trainer's metrics from every running master pod's IP
                         (a simulated run: steps, loss, checkpoints), so `finetune watch` and
                         `kubectl get ftj` show progress; needs the project's Python (make venv);
                         added in place to a running test bed
    hack/cluster up --kueue
                         also Kueue v0.17 (PyTorchJob integration, waitForPodsReady, webhooks
                         served for real) with the ClusterQueue `gpus` (16 H100 GPUs) and the
                         WorkloadPriorityClasses low/high; added in place to a running test bed
    hack/cluster down    stop everything this state dir started (no leaked processes)
    hack/cluster status  health of each component (exit 1 if something is down)
    hack/cluster env     shell exports (KUBECONFIG, PATH, TESTBED_*); `env --json` for programs
    hack/cluster build   only build/fetch the binaries (`build --tools`: kubectl, helm,
                         kubeconform; `build --api-only`: what `up --api-only` needs;
                         `build --kueue`: also Kueue)
    hack/cluster up --trainer
                         also Kubeflow Trainer v2.2 (TrainJob) and JobSet v0.11, webhooks served
                         for real; no ClusterTrainingRuntime installed; added in place
    hack/cluster up --kubernetes 1.31
                         the Kubernetes version (1.35 by default, or 1.31; FINETUNE_K8S_VERSION);
                         binaries are cached per version

What `up` starts, all on 127.0.0.1 with free ports: etcd (v3.6 built from hack/etcd-3.6; for
Kubernetes 1.31 Debian's etcd-server, 3.4), kube-apiserver (RBAC, service-account keys,
static-token users), kube-controller-manager, kube-scheduler (v1.35 built from Go modules by
hack/k8s-1.35, or v1.31 by hack/k8s), kwok with fake GPU nodes and
our pod Stages (hack/kwok), the fake trainer's rendezvous, a storage provisioner (default
StorageClass `standard`), and the Kubeflow training-operator with its PyTorchJob CRD and a real
validating webhook. See hack/README.md; hack/walkthrough runs README's walk-through on it.

Environment:
  KUBECONFIG                 an existing cluster: `up` starts nothing (only builds the tools)
  KUBEBUILDER_ASSETS         use kube-apiserver/etcd/kubectl (and kube-controller-manager,
                             kube-scheduler if present) from there instead of building them
  FINETUNE_TESTBED_STATE     state dir (default: <repo>/hack/.state, git-ignored)
  FINETUNE_TESTBED_CACHE     binary cache (default: ${XDG_CACHE_HOME:-~/.cache}/finetune-operator)
  TESTBED_GPU_NODES          number of fake 8x H100-80GB nodes (default 2)
  TESTBED_A100_NODES         number of fake 8x A100-40GB nodes (default 1)
  TESTBED_IMAGES             repository names the fake registry holds besides finetune-trainer,
                             finetune-operator and busybox (comma-separated, e.g. pytorch);
                             pods with other images wait in ErrImagePull/ImagePullBackOff
  TESTBED_POD_RUN_SECONDS    how long a training pod runs before it completes (default 5)
  TESTBED_TRAINER_METRICS    1: as `up --trainer-metrics` (default 0)
  TESTBED_KUEUE              1: as `up --kueue` / `build --kueue` (default 0)
  TESTBED_TRAINER            1: as `up --trainer` / `build --trainer` (default 0)
  FINETUNE_K8S_VERSION       Kubernetes minor, 1.35 (default; etcd 3.6) or 1.31 (etcd 3.4 of
                             Debian); as `--kubernetes` of `up` / `build`
  TESTBED_BUILD_JOBS         go build -p (default: number of CPUs, at most 4)
  TESTBED_UP_TIMEOUT         seconds to wait for health (default 180)
"""
