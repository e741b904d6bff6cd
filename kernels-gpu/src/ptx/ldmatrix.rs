//! ldmatrix
