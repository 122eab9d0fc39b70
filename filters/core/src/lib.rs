//! Host-free core of the infermesh filters.
