{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release already contains it. */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "finetune-operator.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The rules the operator needs in each namespace it watches (see the README's RBAC table). */}}
{{- define "finetune-operator.namespacedRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  # delete: a re-plan after out-of-memory makes the PyTorchJob anew with the new plan
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  # The TrainJob child (child: trainjob), and jobs that started as TrainJobs before a switch
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  # delete: a hung gang is restarted (its pods deleted, resumed from the last checkpoint)
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* Namespaces the trainer PodMonitor selects. */}}
{{- define "finetune-operator.podMonitorNamespaces" -}}
{{- if .Values.podMonitor.namespaces }}
{{- toYaml .Values.podMonitor.namespaces }}
{{- else if .Values.operator.watchNamespaces }}
{{- toYaml .Values.operator.watchNamespaces }}
{{- end }}
{{- end }}

{{/* The FineTuneJob CRD as generated (files/finetunejob.yaml, a copy of crds/finetunejob.yaml). */}}
{{- define "finetune-operator.crd" -}}
{{ .Files.Get "files/finetunejob.yaml" }}
{{- end }}

{{/*
Who holds the FineTuneJob CRD that is already in the cluster, when it is not this release: empty
when there is none (or lookup cannot see the cluster: helm template, client dry run) or this
release owns it. Helm refuses to install over an object it does not own, so the chart leaves
such a CRD alone (crd.yaml) and NOTES.txt says so.
*/}}
{{- define "finetune-operator.crdHolder" -}}
{{- $name := (include "finetune-operator.crd" . | fromYaml).metadata.name }}
{{- $live := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" $name }}
{{- if $live }}
{{- $labels := $live.metadata.labels | default dict }}
{{- $annotations := $live.metadata.annotations | default dict }}
{{- $release := index $annotations "meta.helm.sh/release-name" | default "" }}
{{- $namespace := index $annotations "meta.helm.sh/release-namespace" | default "" }}
{{- $helm := eq (index $labels "app.kubernetes.io/managed-by" | default "") "Helm" }}
{{- if not (and $helm (eq $release .Release.Name) (eq $namespace .Release.Namespace)) }}
{{- if and $helm $release }}
{{- printf "the Helm release %s in namespace %s" $release $namespace }}
{{- else }}
{{- print "kubectl or another tool, not a Helm release" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Non-empty when this release installs and upgrades the CRD (crds.install, and no one else holds it). */}}
{{- define "finetune-operator.crdRendered" -}}
{{- if and .Values.crds.install (not (include "finetune-operator.crdHolder" .)) }}true{{ end }}
{{- end }}

{{/* "same" when the cluster's CRD is this chart's version (the spec hash annotation), else "differs". */}}
{{- define "finetune-operator.crdVersion" -}}
{{- $crd := include "finetune-operator.crd" . | fromYaml }}
{{- $live := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" $crd.metadata.name }}
{{- $key := "finetune.dev/spec-sha256" }}
{{- $mine := index ($crd.metadata.annotations | default dict) $key }}
{{- $theirs := dig "metadata" "annotations" $key "" ($live | default dict) }}
{{- if eq $mine $theirs }}same{{ else }}differs{{ end }}
{{- end }}
