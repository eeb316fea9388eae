"""Facts about the Kubernetes versions the CRDs need (plain constants: the CLI's help
reads them without loading the models)."""

# The oldest Kubernetes whose API server accepts these CRDs (CEL's quantity library).
MIN_KUBERNETES = "1.29"
